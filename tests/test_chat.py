"""Chat messages as each expert's prompt: the GGUF's own template, BOS handling, the transcript, bad input."""

import pytest

from moe2lib.errors import InputError
from moe2lib.serve import chat
from moe2lib.serve.coordinator import clients_from_urls

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Name a colour."}]


@pytest.mark.slow  # reads the packaged GGUFs
def test_the_ggufs_own_template_with_its_special_tokens():
    smol = chat.ChatTemplate.from_gguf("smollm2-135m-instruct")
    assert (smol.bos_token, smol.eos_token, smol.adds_bos) == ("<|im_start|>", "<|im_end|>", False)
    assert smol.render(MESSAGES) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        "Hello.<|im_end|>\n<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\n")
    # without a system message the template puts in its own default one
    assert smol.render(MESSAGES[1:2]).startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert chat.ChatTemplate.from_gguf("gemma3-270m") is None  # a base model: no template in its GGUF
    assert chat.render(MESSAGES[1:2], None) == ("User: Hi\nAssistant:", "transcript")


def test_a_leading_bos_is_left_to_a_server_that_adds_one():
    source = "{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{{ eos_token }}{% endfor %}" \
             "{% if add_generation_prompt %}<assistant>{% endif %}"
    adds = chat.ChatTemplate(source, "<bos>", "<eos>", adds_bos=True)
    assert adds.render(MESSAGES[1:2]) == "<user>Hi<eos><assistant>"
    assert chat.ChatTemplate(source, "<bos>", "<eos>").render(MESSAGES[1:2]) == "<bos><user>Hi<eos><assistant>"


def test_bad_messages_and_templates_are_input_errors():
    for bad, param in [([], "messages"), ("Hi", "messages"), ([{"role": "robot", "content": "x"}], "messages[0]"),
                       ([{"role": "user", "content": "x"}, {"role": "user"}], "messages[1]")]:
        with pytest.raises(InputError) as info:
            chat.transcript(bad)
        assert info.value.param == param
    strict = chat.ChatTemplate("{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first') }}"
                               "{% endif %}{{ messages[0]['content'] }}")
    with pytest.raises(InputError, match="user first") as info:
        chat.render(MESSAGES, strict)
    assert info.value.param == "messages"
    with pytest.raises(InputError, match="does not compile") as info:
        chat.render(MESSAGES, chat.ChatTemplate("{% for %}"))
    assert info.value.param == "chat_template"
    assert chat.gate_text(MESSAGES) == "Be brief.\nHi\nHello.\nName a colour."


@pytest.mark.slow  # reads the packaged GGUFs
def test_clients_are_told_their_templates_by_expert_name():
    a, b = clients_from_urls("a=http://127.0.0.1:1,b=http://127.0.0.1:2", chat_templates="a=smollm2-135m-instruct")
    assert a.chat_template == chat.ChatTemplate.from_gguf("smollm2-135m-instruct") and b.chat_template is None
    for bad, match in [("c=smollm2-135m-instruct", "no expert named 'c'"), ("a", "name=MODEL")]:
        with pytest.raises(InputError, match=match) as info:
            clients_from_urls("a=http://127.0.0.1:1", chat_templates=bad)
        assert info.value.param == "chat_templates"
