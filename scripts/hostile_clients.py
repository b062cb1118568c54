#!/usr/bin/env python3
"""Hostile clients against an OTA server on the loopback: what one network peer can try.
The attacks and the report are `devicekit.hostile`; run with --help for the command line."""
import sys

from devicekit.hostile import main

if __name__ == "__main__":
    sys.exit(main())
