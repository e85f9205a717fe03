"""The HTTP gateway: validates comparisons, stores them in Redis and queues them for workers."""
