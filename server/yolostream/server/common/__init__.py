"""Shared vocabulary of every yolostream process: errors, settings, sizing, the model card, letterbox geometry,
object requests and host facts. Torch-free and grpc-free, so front-ends, the device and offline tools all import it.
"""
