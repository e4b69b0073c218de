"""Developer tools (the fault harness, probes): not shipped in the wheel."""
