"""Task modules; each task is named ``ibutsu_server.tasks.<module>.<function>`` on the wire."""
