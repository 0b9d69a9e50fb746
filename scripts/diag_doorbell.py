"""Diagnose doorbell behaviour step by step with a watchdog (prints where it stalls)."""
import ctypes, faulthandler, sys, time
faulthandler.dump_traceback_later(20, exit=True)
import numpy as np
import nexusrt as nrt
from nexusrt.firmware.driver import call, cu

def step(msg): print(time.strftime("%X"), msg, flush=True)
nrt.firmware.init(backend="cuda"); rt = nrt.firmware.runtime()
s, c = rt.streams["compute"], rt.streams["control"]
step("A: device word, stream ring")
w = int(call("cuMemAlloc", 4)); call("cuMemsetD32", w, 0, 1)
call("cuStreamWaitValue32", s.handle, w, 1, cu().CUstreamWaitValue_flags.CU_STREAM_WAIT_VALUE_GEQ)
ev = nrt.firmware.event(False).record(s); step(f"A queued, done={ev.query()}")
call("cuStreamWriteValue32", c.handle, w, 1, 0); step("A rung")
t0=time.time()
while not ev.query() and time.time()-t0 < 3: pass
step(f"A done={ev.query()}")
step("B: host-mapped word, host ring")
bell = nrt.firmware.doorbell("x")
bell.wait_on(s); ev2 = nrt.firmware.event(False).record(s); step(f"B queued done={ev2.query()}")
out = np.empty(1, np.int32)
call("cuMemcpyDtoH", out.ctypes.data, w, 4); step("B legacy dtoh while gated ok")
bell.ring(); step("B rung")
t0=time.time()
while not ev2.query() and time.time()-t0 < 3: pass
step(f"B done={ev2.query()}")
step("C: host-mapped word, stream ring")
bell.wait_on(s); ev3 = nrt.firmware.event(False).record(s)
bell.ring(stream=c)
t0=time.time()
while not ev3.query() and time.time()-t0 < 3: pass
step(f"C done={ev3.query()} value={bell.value}")
