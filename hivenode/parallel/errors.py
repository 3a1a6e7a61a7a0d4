"""The parallel part's exception: a step, a join or a stage that cannot go on."""


class ParallelError(Exception):
    """Data- or pipeline-parallel training cannot go on; the message says why and what to do."""
