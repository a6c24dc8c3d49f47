"""What every program shares: the program skeleton (program.py) and its Config (config.py), the
state of a resumable run (run_state.py, checkpoint_store.py, keras_resume.py), the online programs'
skeleton (online_program.py), timing, memory probes, worker subprocesses, provenance, plots, and
the console-script entry points (cli.py)."""
