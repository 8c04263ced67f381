"""Task modules; each task is registered under its wire name from ibutsu_server.task_names."""
