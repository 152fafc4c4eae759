"""What each torch-free front-end process runs: the gRPC server and servicer, stream sessions, the frame pipeline
(decode and letterbox), option validation, metrics, and the link to the device process. Never imports torch.
"""
