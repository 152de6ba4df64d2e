"""The floor everything stands on: errors, device and precision choices, the allocator, atomic writes, the run lock."""
