"""The driver layer, the bottom of the device stack: checked CUDA Driver API and NVRTC calls
(:mod:`~nexusrt.driver.calls`), the backend probe, the device and its hardware profile,
streams and events, doorbells and the bound on blocking waits.

Nothing here allocates arena memory or compiles a kernel; :mod:`nexusrt.firmware` boots
these pieces together with the memory and kernel layers.
"""
