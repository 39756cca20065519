"""Test support shared by the tests, the benches and the demo: synthetic volumes, writers of every input format,
readers of committed output, and faults planted in the real pipeline. Nothing in production imports it."""
