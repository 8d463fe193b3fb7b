"""Chat messages as each expert's prompt text: the model's own chat template, as its llama.cpp server renders it.

Experts can be different base models, each trained on its own chat format (SmolLM2's ChatML, Gemma's turns);
a conversation is therefore rendered once per expert with the Jinja template stored in that expert's GGUF
(``tokenizer.chat_template``), by llama-cpp-python's ``Jinja2ChatFormatter`` with the model's BOS/EOS strings
and the assistant's generation prompt: the same text llama-cpp-python's own ``/v1/chat/completions`` feeds the
model, and the same as transformers' ``apply_chat_template`` (checked in tests/test_endpoint.py). The fused
answer is then appended to every expert's rendering, so each keeps reading the conversation in its format.

The experts' completion servers prepend BOS themselves where the model asks for one; a template that writes
``bos_token`` itself (Gemma-style) would then give two, so a leading BOS string is left out of the text for
such models (what llama-cpp-python's chat handler does by tokenising the rendering without adding BOS).
A model whose GGUF has no chat template (a base model such as Gemma-3-270M) gets the plain transcript
:func:`transcript` ("User: ...\\nAssistant:"), the format base models continue best; each expert's format is
reported with the answer.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError

ROLES = ("system", "user", "assistant")


def check_messages(messages) -> list[dict[str, str]]:
    """Chat messages as ``[{"role", "content"}]`` (roles system|user|assistant, string content), else InputError
    naming the bad message."""
    if not isinstance(messages, list) or not messages:
        raise InputError("messages must be a non-empty list", param="messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in ROLES:
            raise InputError("each message needs role system|user|assistant and string content",
                             param=f"messages[{i}]")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def transcript(messages) -> str:
    """Chat messages as one plain transcript ("System:/User:/Assistant:"), for a model without a chat template."""
    lines = [f"{m['role'].capitalize()}: {m['content']}" for m in check_messages(messages)]
    return "\n".join(lines) + "\nAssistant:"


def gate_text(messages) -> str:
    """The text the gating network weighs the experts by: the messages' contents, one per line (it was trained
    on question texts, without role labels or template markup)."""
    return "\n".join(m["content"] for m in check_messages(messages))


@dataclass(frozen=True)
class ChatTemplate:
    """A model's chat template (Jinja source from its GGUF) with the strings it is rendered with."""

    source: str
    bos_token: str = ""
    eos_token: str = ""
    adds_bos: bool = False        # the model's server prepends BOS to a text prompt itself

    @classmethod
    def from_gguf(cls, model: str | Path) -> "ChatTemplate | None":
        """The template of a GGUF model (a path or registered model name); None when it has none."""
        from ..models import registry

        p = Path(model).expanduser()
        return _read_gguf(str(p if p.suffix == ".gguf" and p.exists() else registry.locate(str(model), "llm")))

    def render(self, messages) -> str:
        """The conversation as this model's prompt text, ending in the assistant's generation prompt."""
        text = _formatter(self.source, self.bos_token, self.eos_token)(messages=check_messages(messages)).prompt
        if self.adds_bos and self.bos_token and text.startswith(self.bos_token):
            text = text[len(self.bos_token):]
        return text


@functools.lru_cache(maxsize=None)
def _read_gguf(path: str) -> ChatTemplate | None:
    import llama_cpp

    llm = llama_cpp.Llama(path, vocab_only=True, verbose=False)
    try:
        source = llm.metadata.get("tokenizer.chat_template")
        if not source:
            return None

        def text(token_id):  # as llama-cpp-python builds its own chat handler from the GGUF
            return llm._model.token_get_text(token_id) if token_id != -1 else ""
        return ChatTemplate(source, text(llm.token_bos()), text(llm.token_eos()), bool(llm._model.add_bos_token()))
    finally:
        llm.close()


@functools.lru_cache(maxsize=32)
def _formatter(source: str, bos_token: str, eos_token: str):
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    try:
        return Jinja2ChatFormatter(source, eos_token=eos_token, bos_token=bos_token, add_generation_prompt=True)
    except Exception as exc:  # noqa: BLE001 - jinja2's errors: a template that does not compile
        raise InputError(f"the chat template does not compile ({type(exc).__name__}: {exc})",
                         param="chat_template") from None


def render(messages, template: ChatTemplate | None) -> tuple[str, str]:
    """(prompt text, format) of a conversation for one expert: ``"chat_template"`` or ``"transcript"``."""
    if template is None:
        return transcript(messages), "transcript"
    try:
        return template.render(messages), "chat_template"
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - the template's own raise_exception (e.g. roles out of order)
        raise InputError(f"the conversation does not fit the expert's chat template: {exc}",
                         param="messages") from None
