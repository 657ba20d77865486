"""The machine: process containment, ports, GPUs and their memory, RDMA, cache directories.

``procfs``/``cgroups``/``supervisor``/``procs``/``registry``/``reaper`` own every
process tree kiln starts and prove nothing outlives it; ``ports`` reserves TCP
ports host-wide; ``gpu*`` discovers devices, reads their memory and waits for
it back; ``amdgpu`` maps AMD GPU indices to their KFD render nodes; ``alloc``
picks GPUs for a server; ``ib`` finds RDMA rails;
``cachedir`` builds shared cache directories once. It knows no engine, image
or test: it may import only ``ci.text`` (and the supervisor, run under
``python -I -S``, only the stdlib, ``procfs`` and ``cgroups``).
"""
