"""What tests and benchmarks share: a real `bentoml serve` on a free port, drawn test faces,
and a tiny trained registry. Installed with the project, so both import it as they are."""
