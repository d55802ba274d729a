"""Memory profiles (TOML), shipped with the package: each states only its decisions."""

if __name__ != "threedis.profiles":  # found as a bare `profiles` (checkout root on sys.path): yield to an installed one
    from threedis._step_aside import step_aside

    step_aside(__name__, __file__)
