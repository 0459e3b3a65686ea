"""The LanguageModel API misused the ways a user might."""

import pytest

from afmkit.errors import UserError


def test_logits_of_ragged_batches_are_refused(tiny_model):
    with pytest.raises(UserError, match="equal-length"):
        tiny_model.logits([[1, 2, 3], [4, 5]])


def test_chat_needs_a_conversation_of_known_roles(tiny_model):
    with pytest.raises(UserError, match="conversation"):
        tiny_model.chat([])
    with pytest.raises(UserError, match="role"):
        tiny_model.chat([{"role": "robot", "content": "hi"}])


def test_sampling_given_twice_is_refused(tiny_model):
    from afmkit.infer.sampling import SamplingParams

    with pytest.raises(UserError, match="not both"):
        tiny_model.generate("hi", sampling=SamplingParams(), temperature=0.5)
