"""Benchmarks of perpetual_logits: speed (``speed.py``), quality (``quality.py``), the stories260K judge
(``llama2c.py``) and the report (``report.py``). ``python benchmarks/run_all.py`` regenerates everything."""
