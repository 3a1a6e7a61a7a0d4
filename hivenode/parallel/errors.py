"""The parallel part's exception: a step, a join or a stage that cannot go on."""


class ParallelError(Exception):
    """Data- or pipeline-parallel training cannot go on; the message says why and what to do."""


def first_error(group: BaseExceptionGroup[ParallelError]) -> ParallelError:
    """The first ParallelError of a nursery's group: what the caller is told."""
    found = group.exceptions[0]
    while isinstance(found, BaseExceptionGroup):
        found = found.exceptions[0]
    return found
