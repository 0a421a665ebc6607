"""Bad input is refused before anything compiles, with a message that names the fix."""

import numpy as np
import pytest
from decode_helpers import tiny

from flaxformer_lite.inference.decode import generate


@pytest.mark.parametrize(
    "prompt, kwargs, message",
    [
        ([], {}, "prompt row 0 is empty.*BOS"),
        ([[5, 6], []], {}, "prompt row 1 is empty"),
        (np.array([[5, 6, 7]]), {"attention_mask": np.array([[0, 0, 0]])}, "prompt row 0 is empty"),
        ([list(range(4, 70))], {}, "66 tokens is longer than model.max_len=64"),
        ([[5, 6, 7]], {"max_new_tokens": 62}, r"prompt \(3\) \+ max_new_tokens \(62\) = 65 .*at most 61"),
        ([[5, 6]], {"method": "beams"}, "unknown method='beams'.*greedy, sample, beam"),
        ([[5, 384]], {}, "prompt_ids holds id 384 outside \\[0, 384\\)"),
        ([[5, -1]], {}, "prompt_ids holds id -1"),
        ([[5, 6]], {"stop_tokens": [999]}, "stop_tokens/eos_token_id holds id 999"),
        ([[5, 6]], {"max_new_tokens": 0}, "max_new_tokens=0 must be an int >= 1"),
        ([[5, 6]], {"min_new_tokens": 9}, r"min_new_tokens=9 must be in \[0, max_new_tokens=4\]"),
        ([[5, 6]], {"method": "sample", "temperature": 0.0}, "temperature=0.0 must be > 0"),
        ([[5, 6]], {"method": "sample", "top_p": 1.5}, r"top_p=1.5 must be in \(0, 1\]"),
        ([[5, 6]], {"method": "beam", "num_beams": 0}, "num_beams=0 must be >= 1"),
        ([[5, 6]], {"method": "beam", "return_logits": True}, "not 'beam'"),
        ([[5, 6]], {"repetition_penalty": 0.0}, "repetition_penalty=0.0 must be > 0 .1 turns it off"),
        ([[5, 6]], {"method": "beam", "repetition_penalty": 1.2}, "repetition_penalty is for method='greedy' or 'sample'"),
        ([[5, 6]], {"attention_mask": np.ones((1, 2))}, "attention_mask is only for a \\[B,P\\] prompt_ids array"),
        (np.array([[0.5, 1.0]]), {}, "prompt_ids must be token ids"),
    ],
)
def test_bad_decoder_input_is_refused(decoder, prompt, kwargs, message):
    model, params = decoder
    kwargs = {"max_new_tokens": 4, **kwargs}
    with pytest.raises(ValueError, match=message):
        generate(model, params, prompt, **kwargs)


def test_encoder_decoder_limits_only_the_new_tokens(encoder_decoder):
    model, params = encoder_decoder
    with pytest.raises(ValueError, match=r"max_new_tokens \(65\) = 65 tokens overflows model.max_len=64"):
        generate(model, params, [[5, 6]], max_new_tokens=65)
    with pytest.raises(ValueError, match="prompt row 0 is empty: pass the text to encode"):
        generate(model, params, [[]], max_new_tokens=4)


def test_encoder_only_models_cannot_generate():
    model, params = tiny("bert_tiny")
    with pytest.raises(ValueError, match="needs a decoder or encoder_decoder model.*family='encoder'"):
        generate(model, params, [[5, 6]], max_new_tokens=4)
