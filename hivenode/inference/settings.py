"""How a node serves and routes inference: the `[inference]` section of the config, whose
home is the settings model."""

from hivenode.agent.settings import InferenceSettings as InferenceSettings
