from ibutsu_testing.fixtures import service_environ

__all__ = ["service_environ"]
