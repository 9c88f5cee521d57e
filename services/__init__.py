"""ocrflow's long-running processes: the resident GPU worker (and its job feeder) and the S3
event intake (HTTP receiver, SQS poller). Their commands live in `flows/service_commands.py`."""
