"""Engine: layout, loading, pipelines, runtime, profiler, CLI (needs diffusers)."""
