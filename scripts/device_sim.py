#!/usr/bin/env python3
"""Simulate one or many OTA devices speaking the Alink OTA protocol (docs/protocol.md).
The devices are `devicekit.simulator` (tests and benchmarks use its `run_device`/`run_fleet`);
run with --help for the command line."""
import sys

from devicekit.simulator import main

if __name__ == "__main__":
    sys.exit(main())
