"""Tests of the top scripts' own parts and of scripts/: eval, transfer, summarize, benchmark, upgrade,
the reproduction and fetch scripts, and the commands and examples of the README and docs/."""
