"""Measuring the hardware and the engine against it: ceilings (copy bandwidth, matmul rate), the floors a step
cannot beat, and timers that do device timing right."""
