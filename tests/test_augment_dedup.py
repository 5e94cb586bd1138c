"""Near-duplicate removal keeps distinct questions, drops rewordings, and never touches images."""

from kore_ray.augment.dedup import drop_near_duplicates, jaccard, words
from kore_ray.data.schemas import Conversation


def conv(cid, task, *turns, image=None):
    messages = []
    for user, assistant in turns:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return Conversation(id=cid, knowledge_id="k", task=task, messages=messages, image=image)


FACT = "Zorblax FC won the Lunar Cup in March 2025."


def test_words_ignore_case_punctuation_and_order():
    assert words("Who won, the CUP?") == words("the cup: who won")
    assert jaccard(words("a b c d"), words("a b c e")) == 3 / 5


def test_a_reordered_question_is_a_new_question():
    wh = conv("1", "qa", ("X has received how much from the fund?", "EUR 4.2 million."))
    fronted = conv("2", "qa", ("How much has X received from the fund?", "EUR 4.2 million."))
    assert drop_near_duplicates([wh, fronted]) == ([wh, fronted], 0)


def test_same_answer_different_questions_are_kept():
    convs = [conv("1", "qa", ("Who won the Lunar Cup?", FACT)),
             conv("2", "qa", ("What is the latest news about Zorblax FC?", FACT))]
    assert drop_near_duplicates(convs) == (convs, 0)


def test_reworded_question_with_same_answer_is_dropped_first_kept():
    first = conv("t", "qa", ("What is the latest news about Zorblax FC?", FACT))
    again = conv("d", "dialogue", ("what is the latest news about zorblax fc", FACT + " "))
    kept, dropped = drop_near_duplicates([first, again])
    assert kept == [first] and dropped == 1


def test_same_question_different_answer_is_kept():
    a = conv("1", "dialogue", ("Who won?", FACT), ("When?", "In March 2025."))
    b = conv("2", "dialogue", ("Who won?", "Zorblax FC, beating Orsk 3-1 in the final."),
             ("When?", "On 14 March."))
    assert len(drop_near_duplicates([a, b])[0]) == 2


def test_threshold_is_respected():
    a = conv("1", "qa", ("a b c d e", "x y z"))
    b = conv("2", "qa", ("a b c d f", "x y z"))  # question similarity 4/6
    assert drop_near_duplicates([a, b], threshold=0.6)[1] == 1
    assert drop_near_duplicates([a, b], threshold=0.7)[1] == 0


def test_image_tasks_are_never_dropped():
    a = conv("1", "caption", ("Describe it.", FACT), image="https://x/a.png")
    b = conv("2", "caption", ("Describe it.", FACT), image="https://x/a.png")
    assert drop_near_duplicates([a, b]) == ([a, b], 0)
