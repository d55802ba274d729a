"""Engine: layout, loading, pipelines, runtime, profiler, CLI (needs diffusers)."""

if __name__ != "threedis.engine":  # found as a bare `engine` (checkout root on sys.path): yield to an installed one
    from threedis._step_aside import step_aside

    step_aside(__name__, __file__)
else:  # before any engine module imports diffusers (-> peft -> bitsandbytes): no kernel-hub lookup at that import
    from threedis.engine.no_kernel_hub import install as _install_no_kernel_hub

    _install_no_kernel_hub()
