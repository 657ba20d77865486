"""Engine images and containers: pulls with mirror fallback, which devices a container gets, logs.

``pull`` tries LAN mirrors then the image's own registry; ``imageref`` parses
references as docker does; ``docker_client`` is the SDK client with deadlines;
``containers`` starts and stops an engine container for a runner profile with
only its allocated GPUs and RDMA devices (``container_devices``), which
``device_plan`` picks for a profile on this host before the start. May import
``ci.profiles``, ``ci.install``, ``ci.host`` and ``ci.text``; not the engine
launch path, kits, warmup or the report.
"""
