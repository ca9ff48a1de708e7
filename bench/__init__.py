"""Throughput benchmark of the service against a model-only ceiling and peer servers (issue 4).

``python -m bench --quick`` smoke-tests the whole comparison in a few minutes; ``python -m bench``
takes the full numbers. The package imports ``models`` and starts ``app`` as a process; neither
imports it. Importing ``bench`` or ``bench.load`` is cheap (no torch), so the load generator can run
in a process of its own without paying torch's import.

Modules:

- :mod:`bench.stats`: percentiles and latency summaries;
- :mod:`bench.load`: the HTTP load generator (closed-loop sweep, open-loop fixed rate);
- :mod:`bench.inputs`: JPEGs made from photos that ship in a package, random-weight checkpoints;
- :mod:`bench.ceiling`: the model-only eager PyTorch loop; :mod:`bench.openvino_ceiling`: OpenVINO's;
- :mod:`bench.peers`: a plain FastAPI endpoint and a LitServe server over the same model code;
- :mod:`bench.servers`: starting, readying and stopping one server process at a time;
- :mod:`bench.report`: the JSON summary, the markdown table and the latency/throughput plot;
- :mod:`bench.run`: the whole comparison (``python -m bench``);
- :mod:`bench.device_check`: a GPU's answers against the CPU's, fp16 / bf16 against fp32 (issue 16);
- :mod:`bench.gpu_report`: one document from what ``bench/gpu.sh`` measured (issue 16);
- :mod:`bench.gpu_wheels`: the wheels a GPU machine without a package index needs for ``bench/gpu.sh``.
"""
