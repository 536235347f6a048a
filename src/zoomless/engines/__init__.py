"""Engines generate text for (images, messages); every job talks to models only through them."""

from zoomless.engines.base import Engine, Generation, SamplingParams, conversation

__all__ = ["Engine", "Generation", "SamplingParams", "conversation"]
