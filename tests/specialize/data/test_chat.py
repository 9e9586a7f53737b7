import pytest

from base.tokenizer import IM_END_ID, IM_START_ID, QwenTokenizer
from specialize.data.chat import ChatError, conversation, generation_prompt, render

S, E, NL = IM_START_ID, IM_END_ID, 198


@pytest.fixture(scope="module")
def tok() -> QwenTokenizer:
    return QwenTokenizer.load()


HELLO = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
# <|im_start|> system \n You are a helpful assistant . <|im_end|> \n        (0-10)
# <|im_start|> user \n Hi <|im_end|> \n                                    (11-16)
# <|im_start|> assistant \n Hello <|im_end|> \n                            (17-22)
HELLO_IDS = [S, 8948, NL, 2610, 525, 264, 10950, 17847, 13, E, NL]
HELLO_IDS += [S, 872, NL, 13048, E, NL, S, 77091, NL, 9707, E, NL]


def _learned(mask: list[int]) -> list[int]:
    return [i for i, m in enumerate(mask) if m]


def test_assistant_policy_learns_the_answer_and_its_end(tok) -> None:
    ids, mask = render(HELLO, tok)
    assert ids == HELLO_IDS
    assert _learned(mask) == [20, 21]  # "Hello", <|im_end|>; not the newline after it


def test_qwen_repo_policy_also_learns_every_turn_frame(tok) -> None:
    ids, mask = render(HELLO, tok, policy="qwen-repo")
    assert ids == HELLO_IDS
    # Each turn's <|im_start|>, <|im_end|> and newline, plus the answer.
    assert _learned(mask) == [0, 9, 10, 11, 15, 16, 17, 20, 21, 22]


def test_multi_turn_and_given_system(tok) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Bye now"},
    ]
    ids, mask = render(messages, tok)
    learned = tok.decode([i for i, m in zip(ids, mask) if m])
    assert learned == "Hello<|im_end|>Bye now<|im_end|>"
    assert tok.decode(ids).startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
    assert len(ids) == len(mask)


def test_generation_prompt_ends_with_the_assistant_header(tok) -> None:
    prompt = generation_prompt(HELLO[:1], tok)
    assert prompt == HELLO_IDS[:20]


def test_generation_prompt_without_a_system_turn(tok) -> None:
    """A reference template without a system turn (bigcode's ChatML prompt) starts at the user."""
    prompt = generation_prompt(HELLO[:1], tok, system=None)
    assert tok.decode(prompt) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_the_tasks_default_system_turn_is_the_chat_default() -> None:
    from specialize.data.chat import DEFAULT_SYSTEM
    from specialize.eval.tasks import DEFAULT_CHAT_SYSTEM

    assert DEFAULT_CHAT_SYSTEM == DEFAULT_SYSTEM


def test_prompt_response_form(tok) -> None:
    record = {"prompt": "Hi", "response": "Hello"}
    assert render(conversation(record), tok) == render(HELLO, tok)


@pytest.mark.parametrize(
    "record, reason",
    [
        ([1, 2], "wrong_type"),
        ({"text": "x"}, "missing_field"),
        ({"messages": []}, "wrong_type"),
        ({"messages": [{"role": "bot", "content": "x"}]}, "unknown_role"),
        ({"messages": [{"role": "user", "content": "  "}]}, "empty_content"),
        ({"messages": [{"role": "user", "content": 3}]}, "wrong_type"),
        ({"messages": [{"role": "user", "content": "x"}]}, "no_assistant"),
        (
            {"messages": [HELLO[0], {"role": "system", "content": "x"}, HELLO[1]]},
            "misplaced_system",
        ),
    ],
)
def test_bad_conversations_name_the_reason(record, reason) -> None:
    with pytest.raises(ChatError) as info:
        conversation(record)
    assert info.value.reason == reason


def test_unknown_policy(tok) -> None:
    with pytest.raises(ValueError, match="mask policy"):
        render(HELLO, tok, policy="everything")
