"""Example layouts (JSON), shipped with the package."""

if __name__ != "threedis.examples":  # found as a bare `examples` (checkout root on sys.path): yield to an installed one
    from threedis._step_aside import step_aside

    step_aside(__name__, __file__)
