from zoodip.models.tokenizer import cached_clip_tokenizer, clip_tokenizer


def test_clip_tokenizer_matches_sd15_ids():
    tok = cached_clip_tokenizer()
    assert tok("a photo of a dog").input_ids == [49406, 320, 1125, 539, 320, 1929, 49407]
    assert len(tok) == 49408
    assert tok.model_max_length == 77
    assert tok.pad_token_id == 49407


def test_second_tokenizer_pads_with_exclamation_mark():
    tok = cached_clip_tokenizer("!")
    ids = tok("hi", padding="max_length", max_length=6).input_ids
    assert ids[-1] == 0 and tok.convert_ids_to_tokens(0) == "!"


def test_fresh_and_cached_tokenizers_agree():
    text = "a cube shaped sks backpack, in the style of Ukiyo-e!"
    assert clip_tokenizer()(text).input_ids == cached_clip_tokenizer()(text).input_ids
