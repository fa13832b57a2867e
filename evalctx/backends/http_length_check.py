"""Why the server counted a different number of prompt tokens than evalctx measured: the HTTP backend stops the
run at the first such prompt (a :class:`~evalctx.errors.LengthError`) with one line that names the cause from what
was actually sent -- the server's chat template, a BOS token added or left out, a prefill the template continues
differently, or a tokenizer that splits the text differently -- and the option that fixes it.

:class:`PromptLengthCheck` is a mixin of :class:`evalctx.backends.openai_http.HTTPBackend`; its methods use the
backend's options, preset, tokenizer and prompt text.
"""

from __future__ import annotations

from typing import Any

from evalctx.errors import LengthError
from evalctx.records import GenerationRequest, GenerationResult


def _prefill_insert(tokenizer: Any, req: GenerationRequest) -> str | None:
    """What the tokenizer's chat template writes between the generation prompt and a continued final assistant
    message (``continue_final_message``) that evalctx's prompt does not have, or None (no difference, or no
    Hugging Face template to ask)."""
    hf = getattr(tokenizer, "hf", None)
    messages = (req.extra or {}).get("messages")
    if hf is None or not messages:
        return None
    try:
        continued = hf.apply_chat_template(messages, tokenize=False, continue_final_message=True)
    except Exception:  # a template that refuses to continue a message: nothing to say about it here
        return None
    ours = req.prompt
    if continued == ours:
        return None
    start = next((i for i, (a, b) in enumerate(zip(continued, ours)) if a != b), min(len(continued), len(ours)))
    end = 0
    while end < min(len(continued), len(ours)) - start and continued[-1 - end] == ours[-1 - end]:
        end += 1
    extra = continued[start:len(continued) - end]
    return extra if extra and len(continued) > len(ours) else None


class PromptLengthCheck:
    """The HTTP backend's prompt-count check (see the module doc)."""

    def _check_length(self, req: GenerationRequest, res: GenerationResult) -> None:
        """Stop the run at a prompt the server counted differently, saying why from what was actually sent."""
        n, want = res.n_prompt_tokens, len(req.prompt_ids)
        if res.error is not None or n is None or n == want:
            return
        o = self.options
        head = f"backend http: the server counted {n} prompt tokens for a {want}-token prompt"
        if o.endpoint == "chat":
            if not (req.extra or {}).get("messages"):
                raise LengthError(f"{head}: the chat endpoint wraps the prompt in the server's chat template. Use "
                                  "endpoint=completions for token-exact prompts")
            prefix = req.extra["messages"][-1].get("role") == "assistant"
            if prefix and not o.continue_final_message:
                raise LengthError(f"{head} rendered from the sample's chat messages: with continue_final_message="
                                  "false the server closes the answer prefix (the final assistant message) as a "
                                  "finished turn. Drop continue_final_message=false, or use endpoint=completions "
                                  "(the default): the prompt then goes as evalctx rendered it")
            inserted = _prefill_insert(self.ctx.tokenizer, req) if prefix else None
            if inserted:
                raise LengthError(
                    f"{head} rendered from the sample's chat messages: the chat template renders the answer prefix "
                    f"continued as an assistant turn (continue_final_message) with {inserted!r} before it, text that "
                    f"its generation prompt, which evalctx measured, does not have (an empty think block of a "
                    f"Qwen3-style template). Use endpoint=completions (the default): the prompt then goes as evalctx "
                    f"rendered it")
            prefill = " or ignores continue_final_message (llama.cpp does) and closes the answer prefix" \
                if prefix else ""
            raise LengthError(f"{head} rendered from the sample's chat messages: the server's chat template differs "
                              f"from --tokenizer's{prefill}. Use endpoint=completions (the default): the prompt then "
                              "goes as evalctx rendered it")
        if o.send == "ids":
            raise LengthError(f"{head} sent as token ids: the server does not take the ids as given")
        prompt, add_special = self._prompt_text(req)
        ids_fix = ", or send=ids" if self.preset.takes_ids else ""
        own = "this server adds it whatever it is sent, so --tokenizer must be the served model's own"
        if n == want + 1 and (add_special is False or len(prompt) < len(req.prompt)):
            how = "add_special_tokens=false was sent" if add_special is False else "its BOS text was left out"
            raise LengthError(f"{head}: it added a BOS token although {how}; the server does not honour that. "
                              + ("Use send=ids" if self.preset.takes_ids else "Use prompt_mode raw"))
        added_bos = req.add_special_tokens and self._tokenizer_added_bos(req)
        if n == want + 1 and add_special is None and not added_bos:
            # A chat-templated prompt gets here only from a server that ignores add_special_tokens, with no BOS
            # text to leave out (see _prompt_text): its template starts with none.
            held = "--tokenizer does not add" if req.add_special_tokens \
                else "that --tokenizer's chat template does not start with"
            fix = f"pass --backend-opt add_special_tokens=false{ids_fix}" \
                if self.preset.honours_add_special_tokens else own
            raise LengthError(f"{head}: it added a BOS token {held}; {fix}")
        if n == want - 1 and add_special is None and added_bos:
            fix = f"pass --backend-opt add_special_tokens=true{ids_fix}" \
                if self.preset.honours_add_special_tokens else own.replace("adds it", "leaves it out")
            raise LengthError(f"{head}: it did not add the BOS token that --tokenizer adds; {fix}")
        raise LengthError(f"{head}: its tokenizer splits the prompt text differently from --tokenizer "
                          f"{getattr(self.ctx.tokenizer, 'name', '')}; pass the served model's own tokenizer"
                          + (", or send=ids so that the server gets evalctx's token ids" if self.preset.takes_ids
                             else ""))

    def _tokenizer_added_bos(self, req: GenerationRequest) -> bool:
        """Whether the prompt's ids start with a token the tokenizer added (a BOS), not one of the text."""
        tok = self.ctx.tokenizer
        plain = tok.encode(req.prompt[:200], add_special_tokens=False) if tok is not None else []
        return bool(req.prompt_ids) and req.prompt_ids[:1] != plain[:1]
