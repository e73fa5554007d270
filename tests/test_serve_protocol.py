"""qwenaudio.serve.protocol: the API's rules without a server. Each refusal is checked for its status, its message
and the field it names; the accepted forms for what they turn into (the library's settings and queries)."""

import base64
import json

import pytest

from qwenaudio.core.families import QWEN2_AUDIO, QWEN_AUDIO
from qwenaudio.longform import Segment
from qwenaudio.serve.protocol import (ApiError, Deltas, audio_response, error_body, parse_audio_request, parse_chat,
                                      token_usage)
from qwenaudio.subtitles import Word
from qwenaudio.tasks import Result

SERVED = "tiny"
FILE = object()  # an upload: anything that is not a str
WAV = base64.b64encode(b"RIFF....WAVE").decode()


def form(**fields) -> dict:
    """Form fields as the app hands them over: name -> every value; `file` present unless given as None."""
    out = {"file": [FILE]}
    for name, value in fields.items():
        name = name.replace("__", "[]") if name.endswith("__") else name
        if value is None:
            out.pop(name, None)
        else:
            out[name] = value if isinstance(value, list) else [value]
    return out


def audio(family=QWEN_AUDIO, translation=False, **fields):
    return parse_audio_request(form(**fields), family=family, served=SERVED, translation=translation)


def refused(call, *args, **kwargs) -> ApiError:
    with pytest.raises(ApiError) as caught:
        call(*args, **kwargs)
    return caught.value


def test_a_plain_transcription_request():
    asked = audio()
    assert (asked.task, asked.language, asked.response_format, asked.stream, asked.timed) == (
        "transcribe", "en", "json", False, False)
    assert asked.generation() == {}  # the task's greedy decoding
    assert audio(QWEN2_AUDIO).language is None  # Qwen2-Audio detects the language
    assert audio(temperature="0.7").generation() == {"do_sample": True, "temperature": 0.7}


def test_formats_that_time_words():
    assert audio(response_format="srt").timed and audio(response_format="vtt").timed
    assert not audio(QWEN2_AUDIO, response_format="srt").timed  # one cue per window instead
    words = audio(response_format="verbose_json", timestamp_granularities__=["word", "segment"])
    assert words.words and words.timed
    assert not audio(response_format="verbose_json").timed
    assert audio(response_format="verbose_json", timestamp_granularities="word").words  # without the []


def test_tasks_by_field_and_by_model_alias():
    assert audio(task="caption").task == "caption"
    assert audio(model=f"{SERVED}:scene").task == "scene"
    assert audio(model=SERVED, task="transcribe").task == "transcribe"
    assert audio(QWEN2_AUDIO, model=f"{SERVED}:vocal_sound").task == "vocal_sound"
    translation = audio(translation=True)
    assert (translation.task, translation.language, translation.target_language) == ("translate", "zh", "en")
    assert audio(translation=True, language="en", target_language="zh").target_language == "zh"


@pytest.mark.parametrize("fields, status, message, param", [
    ({"file": None}, 400, "the audio file is missing: send it as the multipart field 'file'", "file"),
    ({"file": "text"}, 400, "'file' must be one uploaded file", "file"),
    ({"file": [FILE, FILE]}, 400, "'file' must be one uploaded file", "file"),
    ({"model": "whisper-1"}, 404, "the model 'whisper-1' does not exist: this server serves tiny, tiny:caption",
     "model"),
    ({"model": "tiny:translate"}, 404, "the model 'tiny:translate' does not exist", "model"),
    ({"response_format": "xml"}, 400, "response_format must be one of json, text, srt, verbose_json, vtt, got 'xml'",
     "response_format"),
    ({"temperature": "hot"}, 400, "temperature must be a number from 0 to 2, got 'hot'", "temperature"),
    ({"temperature": "2.5"}, 400, "temperature must be from 0 to 2 (0: greedy), got 2.5", "temperature"),
    ({"temperature": "nan"}, 400, "temperature must be from 0 to 2", "temperature"),
    ({"temperature": "-1"}, 400, "temperature must be from 0 to 2", "temperature"),
    ({"temperature": "1e-40"}, 400, "temperature must be 0 (greedy decoding) or from 1e-05 to 2, got 1e-40: a "
     "smaller one is greedy in effect and overflows the sampler", "temperature"),
    ({"temperature": "5e-324"}, 400, "temperature must be 0 (greedy decoding) or from 1e-05 to 2, got 5e-324",
     "temperature"),
    ({"prompt": "Hello"}, 400, "prompt is not supported", "prompt"),
    ({"language": "xx"}, 400, "language 'xx' has no tag; Qwen-Audio knows en, zh", "language"),
    ({"task": "translate"}, 400, "task must be one of transcribe, caption, emotion, vocal_sound, scene, "
     "note_analysis on Qwen-Audio, got 'translate' (translate: use /v1/audio/translations)", "task"),
    ({"task": "caption", "model": "tiny:scene"}, 400, "the model alias asks for task 'scene' but the task field says "
     "'caption'", "task"),
    ({"task": "caption", "language": "en"}, 400, "language has no effect on task 'caption'", "language"),
    ({"stream": "yes"}, 400, "stream must be true or false, got 'yes'", "stream"),
    ({"stream": "true", "response_format": "srt"}, 400, "stream=true sends transcript.text events: response_format "
     "must be json or text, got 'srt'", "response_format"),
    ({"timestamp_granularities__": "word"}, 400, "timestamp_granularities[] needs response_format verbose_json",
     "timestamp_granularities[]"),
    ({"timestamp_granularities__": "char", "response_format": "verbose_json"}, 400, "timestamp_granularities[] must "
     "be segment or word, got 'char'", "timestamp_granularities[]"),
    ({"timestamp_granularities__": "word", "response_format": "verbose_json", "task": "caption"}, 400,
     "word timestamps come only with task transcribe", "timestamp_granularities[]"),
    ({"model": ["tiny", "tiny"]}, 400, "'model' was sent 2 times; send it once", "model"),
    ({"language": FILE}, 400, "'language' must be a text field, not a file", "language"),
    ({"speed": "1"}, 400, "unknown field 'speed'; this endpoint reads file, model", "speed"),
    ({"target_language": "de"}, 400, "unknown field 'target_language'", "target_language"),
])
def test_bad_transcription_requests(fields, status, message, param):
    error = refused(audio, **fields)
    assert (error.status, error.param) == (status, param) and message in error.message
    assert error.body() == {"error": {"message": error.message, "type": "invalid_request_error", "param": param,
                                      "code": "model_not_found" if status == 404 else None}}


def test_bad_requests_the_family_decides():
    error = refused(audio, QWEN2_AUDIO, response_format="verbose_json", timestamp_granularities__="word")
    assert error.param == "timestamp_granularities[]" and "Qwen2-Audio has no word timestamps" in error.message
    error = refused(audio, QWEN2_AUDIO, task="scene")
    assert "task must be one of transcribe, caption, emotion, vocal_sound on Qwen2-Audio" in error.message
    error = refused(audio, QWEN2_AUDIO, translation=True, target_language="ja")
    assert error.param == "target_language" and "language 'ja' has no tag; Qwen2-Audio knows" in error.message
    error = refused(audio, translation=True, task="caption")
    assert error.param == "task" and "unknown field 'task'" in error.message


def test_response_formats():
    words = [Word("hello", 0.0, 0.5), Word("world", 0.6, 1.0)]
    result = Result("hello world", words, [Segment("hello world", 0.0, 2.0, words)])
    usage = token_usage(10, 3)
    assert usage == {"type": "tokens", "input_tokens": 10, "output_tokens": 3, "total_tokens": 13}
    assert audio_response(audio(), result, 2.0, usage) == ({"text": "hello world", "usage": usage},
                                                           "application/json")
    assert audio_response(audio(response_format="text"), result, 2.0, usage)[0] == "hello world\n"
    srt, media = audio_response(audio(response_format="srt"), result, 2.0, usage)
    assert srt == "1\n00:00:00,000 --> 00:00:00,500\nhello\n\n2\n00:00:00,600 --> 00:00:01,000\nworld\n"
    assert media.startswith("text/plain")
    vtt, media = audio_response(audio(response_format="vtt"), result, 2.0, usage)
    assert vtt.startswith("WEBVTT\n\n00:00:00.000 --> 00:00:00.500\nhello\n") and media.startswith("text/vtt")
    verbose, _ = audio_response(audio(response_format="verbose_json", timestamp_granularities__="word"), result, 2.0,
                                usage)
    assert verbose["words"] == [{"word": "hello", "start": 0.0, "end": 0.5}, {"word": "world", "start": 0.6,
                                                                              "end": 1.0}]
    assert (verbose["task"], verbose["language"], verbose["duration"], verbose["text"]) == (
        "transcribe", "en", 2.0, "hello world")
    assert verbose["segments"][0] == {
        "id": 0, "seek": 0, "start": 0.0, "end": 2.0, "text": "hello world", "tokens": None, "temperature": 0.0,
        "avg_logprob": None, "compression_ratio": None, "no_speech_prob": None}
    assert "words" not in audio_response(audio(response_format="verbose_json"), result, 2.0, usage)[0]


def chat(body, family=QWEN_AUDIO, context=2048):
    return parse_chat(body, family=family, served=SERVED, context=context)


def audio_part(data=WAV):
    return {"type": "input_audio", "input_audio": {"data": data, "format": "wav"}}


def test_a_chat_in_the_libraries_terms():
    """Two clips over two turns become `Chat`'s history and query: Qwen-Audio's text, Qwen2-Audio's parts; the
    clips are named in order across the conversation."""
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [audio_part(), {"type": "text", "text": "what is it?"}]},
                {"role": "assistant", "content": "a bell"},
                {"role": "user", "content": [{"type": "audio_url",
                                              "audio_url": {"url": f"data:audio/wav;base64,{WAV}"}},
                                             {"type": "text", "text": "and this?"}]}]
    asked = chat({"messages": messages, "model": SERVED, "temperature": 0, "max_tokens": 5, "stop": "\n",
                  "seed": 3, "top_p": 0.5})
    assert asked.system == "Be brief."
    assert asked.history == [("Audio 1:<audio>audio1</audio>\nwhat is it?", "a bell")]
    assert asked.query == "Audio 1:<audio>audio2</audio>\nand this?"
    assert [(c.name, c.where, c.data) for c in asked.clips] == [
        ("audio1", "messages[1].content[0]", b"RIFF....WAVE"), ("audio2", "messages[3].content[0]", b"RIFF....WAVE")]
    assert asked.generation() == {"do_sample": False, "top_p": 0.5, "stop_strings": ("\n",), "seed": 3}
    assert asked.max_tokens == 5 and not asked.stream
    qwen2 = chat({"messages": messages}, QWEN2_AUDIO)
    assert qwen2.history == [([{"audio": "audio1"}, {"text": "what is it?"}], "a bell")]
    assert qwen2.query == [{"audio": "audio2"}, {"text": "and this?"}]
    assert qwen2.generation() == {"top_p": None, "stop_strings": (), "seed": None}  # the checkpoint's sampling
    sampled = chat({"messages": [{"role": "user", "content": "hi"}], "temperature": 0.8})
    assert sampled.generation()["temperature"] == 0.8 and sampled.generation()["do_sample"]
    streamed = chat({"messages": [{"role": "user", "content": "hi"}], "stream": True,
                     "stream_options": {"include_usage": True}, "max_completion_tokens": 7})
    assert streamed.stream and streamed.include_usage and streamed.max_tokens == 7


USER = {"role": "user", "content": "hi"}
NESTED = []  # too deep for Python to write back (repr, json.dumps)
for _ in range(100_000):
    NESTED = [NESTED]


@pytest.mark.parametrize("body, message, param", [
    ([], "the body must be a JSON object, got an array", None),
    ({"messages": []}, "messages must be a non-empty array", "messages"),
    ({"messages": "hi"}, "messages must be a non-empty array", "messages"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0] must be an object whose role is one of system, "
     "developer, user, assistant", "messages[0]"),
    ({"messages": [USER, {"role": "system", "content": "x"}]}, "messages[1]: a system message may only come first",
     "messages[1]"),
    ({"messages": [USER, {"role": "assistant", "content": "x"}]}, "messages[1]: the last message must be the user's",
     "messages"),
    ({"messages": [{"role": "system", "content": "x"}]}, "the last message must be the user's", "messages"),
    ({"messages": [{"role": "user", "content": []}]}, "messages[0].content must be a string or a non-empty array",
     "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages[0].content[0] must be a part of type text, input_audio or audio_url, got \"image_url\"",
     "messages[0].content[0]"),
    ({"messages": [{"role": "user", "content": [audio_part("not base64!")]}]},
     "messages[0].content[0].input_audio.data is not valid base64", "messages[0].content[0].input_audio.data"),
    ({"messages": [{"role": "user", "content": [audio_part("")]}]}, "input_audio.data is empty", None),
    ({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": "x"}]}]},
     "messages[0].content[0].input_audio must be {\"data\": base64", "messages[0].content[0].input_audio"),
    ({"messages": [{"role": "user", "content": [{"type": "audio_url", "audio_url": {"url": "data:audio/wav,abc"}}]}]},
     "must be a base64 data URL", "messages[0].content[0].audio_url"),
    ({"messages": [{"role": "user", "content": [{"type": "audio_url", "audio_url": {"url": "file:///etc/passwd"}}]}]},
     "audio_url.url must be a data: URL (or, where the server allows, http(s)), got 'file:///etc/passwd'", None),
    ({"messages": [{"role": "user", "content": "<audio>/etc/passwd</audio> what is it?"}]},
     "messages[0].content holds '</audio>', which Qwen-Audio reads as a clip's place", "messages[0].content"),
    ({"messages": [{"role": "system", "content": "x<audio>a.wav"}, USER]}, "messages[0].content holds '<audio>'",
     None),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "<aud"}, {"type": "text", "text": "io>/etc/"
                                                "passwd</aud"}, {"type": "text", "text": "io>what is it?"}]}]},
     "messages[0].content holds '</audio>', which Qwen-Audio reads as a clip's place", "messages[0].content"),
    ({"messages": [{"role": "system", "content": [{"type": "text", "text": "<aud"}, {"type": "text", "text": "io>x"}]},
                   USER]}, "messages[0].content holds '<audio>'", "messages[0].content"),
    ({"messages": [USER, {"role": "assistant", "content": [{"type": "text", "text": "</aud"},
                                                           {"type": "text", "text": "io>"}]}, USER]},
     "messages[1].content holds '</audio>'", "messages[1].content"),
    ({"messages": [{"role": "assistant", "content": "Hello!"}, USER]}, "messages[0]: a Qwen-Audio conversation cannot "
     "open with the assistant's message: its chat (the official make_context) pairs each reply with the user's "
     "message before it", "messages[0]"),
    ({"messages": [USER], "model": "gpt-4o"}, "the model 'gpt-4o' does not exist: this server serves tiny", "model"),
    ({"messages": [USER], "model": "tiny:caption"}, "the model 'tiny:caption' does not exist", "model"),
    ({"messages": [USER], "max_tokens": -5}, "max_tokens must be at least 1, got -5", "max_tokens"),
    ({"messages": [USER], "max_tokens": 0}, "max_tokens must be at least 1, got 0", "max_tokens"),
    ({"messages": [USER], "max_tokens": 10**12}, "max_tokens is 1000000000000, but a request's prompt and reply "
     "share 2048 tokens on this server", "max_tokens"),
    ({"messages": [USER], "max_completion_tokens": 2.5}, "max_completion_tokens must be a whole number, got 2.5",
     "max_completion_tokens"),
    ({"messages": [USER], "max_tokens": True}, "max_tokens must be a whole number, got true", "max_tokens"),
    ({"messages": [USER], "temperature": 3}, "temperature must be a number in [0, 2], got 3", "temperature"),
    ({"messages": [USER], "temperature": "hot"}, "temperature must be a number in [0, 2], got \"hot\"", "temperature"),
    ({"messages": [USER], "temperature": 1e-40}, "temperature must be 0 (greedy decoding) or from 1e-05 to 2, got "
     "1e-40", "temperature"),
    ({"messages": [USER], "top_p": 0}, "top_p must be a number in (0, 1], got 0", "top_p"),
    ({"messages": [USER], "stop": ["a", "b", "c", "d", "e"]}, "stop must be a non-empty string or an array of at "
     "most 4", "stop"),
    ({"messages": [USER], "stop": [""]}, "stop must be a non-empty string", "stop"),
    ({"messages": [USER], "seed": -1}, "seed must be a whole number from 0 to 2**63 - 1, got -1", "seed"),
    ({"messages": [USER], "n": 2}, "n must be 1 (one reply per request), got 2", "n"),
    ({"messages": [USER], "stream": "yes"}, "stream must be true or false, got \"yes\"", "stream"),
    ({"messages": [USER], "stream_options": {"include_usage": True}}, "stream_options must be", "stream_options"),
    ({"messages": [USER], "best_of": 2}, "unsupported field 'best_of'; this server reads model, messages", "best_of"),
    ({"messages": [USER], "best_of": None}, "unsupported field 'best_of'", "best_of"),
    ({"messages": [USER], "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools is not supported by "
     "this server: leave it out or send [], got [{\"type\": \"function\", \"function\": {\"name\": \"f\"}}]", "tools"),
    ({"messages": [USER], "frequency_penalty": 0.5}, "frequency_penalty is not supported by this server: leave it out "
     "or send 0, got 0.5", "frequency_penalty"),
    ({"messages": [USER], "presence_penalty": -1}, "presence_penalty is not supported", "presence_penalty"),
    ({"messages": [USER], "logprobs": True}, "logprobs is not supported by this server: leave it out or send false, "
     "got true", "logprobs"),
    ({"messages": [USER], "logprobs": 0}, "logprobs is not supported", "logprobs"),  # 0 is not false
    ({"messages": [USER], "top_logprobs": 5}, "top_logprobs is not supported", "top_logprobs"),
    ({"messages": [USER], "response_format": {"type": "json_object"}}, "response_format is not supported by this "
     "server: leave it out or send {\"type\": \"text\"}, got {\"type\": \"json_object\"}", "response_format"),
    ({"messages": [USER], "tool_choice": "auto"}, "tool_choice is not supported", "tool_choice"),
    ({"messages": [USER], "store": True}, "store is not supported by this server: leave it out or send false",
     "store"),
    ({"messages": [USER], "service_tier": "flex"}, "leave it out or send \"auto\" or \"default\", got \"flex\"",
     "service_tier"),
    ({"messages": [USER], "audio": {"voice": "alloy", "format": "wav"}}, "audio is not supported by this server: "
     "leave it out, got {\"voice\"", "audio"),
    ({"messages": [USER], "parallel_tool_calls": 1}, "parallel_tool_calls is not supported", "parallel_tool_calls"),
    ({"messages": [USER], "user": 5}, "user must be a string, got 5", "user"),
    ({"messages": [USER], "metadata": "x"}, "metadata must be an object, got \"x\"", "metadata"),
    ({"messages": [USER], "tools": ["x" * 100]}, "got [\"" + "x" * 58 + "…", "tools"),
    ({"messages": [USER], "temperature": NESTED}, "temperature must be a number in [0, 2], got an array",
     "temperature"),
    ({"messages": [{"role": "user", "content": [{"type": NESTED}]}]}, "messages[0].content[0] must be a part of type "
     "text, input_audio or audio_url, got an array", "messages[0].content[0]"),
])
def test_bad_chat_requests(body, message, param):
    error = refused(chat, body)
    assert error.status == (404 if "does not exist" in message else 400)
    assert message in error.message, error.message
    assert param is None or error.param == param


def test_nulls_are_absent_and_neutral_fields_are_ignored():
    """What OpenAI's SDKs and tools send by default: explicit nulls, and fields whose value asks for nothing."""
    plain = chat({"messages": [USER]})
    nulls = {name: None for name in ("model", "max_tokens", "max_completion_tokens", "temperature", "top_p", "stop",
                                     "seed", "n", "stream", "stream_options", "frequency_penalty", "logprobs",
                                     "top_logprobs", "response_format", "tools", "tool_choice", "user", "metadata",
                                     "audio", "prediction", "reasoning_effort")}
    neutral = {"frequency_penalty": 0, "presence_penalty": 0.0, "logprobs": False, "top_logprobs": 0,
               "response_format": {"type": "text"}, "modalities": ["text"], "logit_bias": {}, "store": False,
               "service_tier": "auto", "tools": [], "tool_choice": "none", "parallel_tool_calls": True,
               "functions": [], "function_call": "none", "user": "user-1234", "metadata": {"k": "v"},
               "safety_identifier": "abc", "prompt_cache_key": "k"}
    for body in (nulls, neutral):
        assert chat({"messages": [USER], **body}) == plain
    streamed = chat({"messages": [USER], "stream": True, "stream_options": {"include_usage": None}})
    assert streamed.stream and not streamed.include_usage


def test_messages_of_one_role_in_a_row_are_one():
    """A clip sent alone and the question after it are one turn, as one message with both parts would be; texts of
    two messages are a line each."""
    clip_then_question = [{"role": "user", "content": [audio_part()]}, {"role": "user", "content": "What is it?"}]
    one_message = [{"role": "user", "content": [audio_part(), {"type": "text", "text": "What is it?"}]}]
    for family in (QWEN_AUDIO, QWEN2_AUDIO):
        assert chat({"messages": clip_then_question}, family) == chat({"messages": one_message}, family)
    assert chat({"messages": clip_then_question}).query == "Audio 1:<audio>audio1</audio>\nWhat is it?"
    texts = chat({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello."},
                               {"role": "assistant", "content": "Hi."}, {"role": "assistant", "content": "Ask me."},
                               {"role": "user", "content": "One."},
                               {"role": "user", "content": [{"type": "text", "text": "Two."}, audio_part()]},
                               {"role": "user", "content": [audio_part(), {"type": "text", "text": "Three."}]}]},
                 QWEN2_AUDIO)
    assert texts.history == [("Hello.", "Hi.\nAsk me.")]
    assert texts.query == [{"text": "One."}, {"text": "\n"}, {"text": "Two."}, {"audio": "audio1"},
                           {"audio": "audio2"}, {"text": "Three."}]


def test_a_qwen2_conversation_may_open_with_the_assistant():
    """As transformers' chat template renders it: the assistant's turn alone (`Chat`'s history pair (None, reply))."""
    asked = chat({"messages": [{"role": "assistant", "content": "Send me a clip."},
                               {"role": "assistant", "content": "Any clip."}, USER]}, QWEN2_AUDIO)
    assert asked.history == [(None, "Send me a clip.\nAny clip.")] and asked.query == "hi"


def test_typed_audio_tags_are_each_familys():
    """Qwen2-Audio's tokenizer reads `<audio>` as text (a query holding one the library refuses itself), and its
    `<|AUDIO|>` as a clip's place in any message."""
    asked = chat({"messages": [{"role": "user", "content": "<audio>x</audio>"}]}, QWEN2_AUDIO)
    assert asked.query == "<audio>x</audio>"
    for messages, at in [([{"role": "system", "content": "<|AUDIO|>"}, USER], "messages[0].content"),
                         ([{"role": "user", "content": [{"type": "text", "text": "<|AU"}, {"type": "text",
                                                                                           "text": "DIO|>"}]}],
                          "messages[0].content")]:
        error = refused(chat, {"messages": messages}, QWEN2_AUDIO)
        assert error.message == (f"{at} holds '<|AUDIO|>', which Qwen2-Audio reads as a clip's place: send clips "
                                 "as input_audio or audio_url parts") and error.param == at


def test_remote_urls_are_kept_for_the_app_to_allow_or_refuse():
    part = {"type": "audio_url", "audio_url": {"url": "https://example.com/a.wav"}}
    clip, = chat({"messages": [{"role": "user", "content": [part]}]}).clips
    assert (clip.url, clip.data) == ("https://example.com/a.wav", None)


def test_deltas_join_into_the_final_text():
    deltas = Deltas(stop_strings=["STOP"])
    pieces = [deltas.piece(t) for t in ["Hel", "Hello w\ufffd", "Hello wö", "Hello wörld S", "Hello wörld ST"]]
    assert pieces == ["Hel", "lo w", "ö", "rld ", ""]  # a possible stop string's start is held back
    assert deltas.piece("Hello wörld ", final=True) == ""  # ...and was one
    deltas = Deltas(stop_strings=["STOP"])
    assert "".join(deltas.piece(t) for t in ["a S", "a Sb"]) + deltas.piece("a Sb!", final=True) == "a Sb!"
    assert Deltas().piece("abc") == "abc"


def test_error_bodies_are_openais():
    assert error_body(429, "busy", code="rate_limit_exceeded") == {
        "error": {"message": "busy", "type": "rate_limit_error", "param": None, "code": "rate_limit_exceeded"}}
    assert json.loads(json.dumps(error_body(500, "x")))["error"]["type"] == "server_error"
