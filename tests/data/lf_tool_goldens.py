"""Function-calling renderings by LLaMA-Factory 0.9.5 itself: literal expected strings for tests/data/test_data_tools.py.

Obtained once (not at test time) in a side venv (/work/sidevenv-lf: torch 2.13.0 CPU, llamafactory==0.9.5 with
transformers 4.57.1): `llamafactory.data.template.TEMPLATES[name].encode_multiturn(tok, MESSAGES, system, TOOLS)`
with a stand-in tokenizer whose encode(text) returns [text] and whose special tokens are their own names, so
each turn's "ids" joined are its text ("{bos}" / "{eos}" mark the tokenizer's BOS / EOS; "{date}" marks the
day LLaMA-Factory's llama3 tool prompt writes, datetime.now().strftime("%d %b %Y")). Per turn: (prompt, response).
"""
# flake8: noqa: E501

TOOLS = '[{"name": "get_weather", "description": "Météo for a city", "parameters": {"type": "object", "properties": {"location": {"type": "string", "description": "the city"}, "unit": {"type": "string", "description": "degrees", "enum": ["c", "f"]}}, "required": ["location"]}}, {"type": "function", "function": {"name": "get_time", "description": "the local time", "parameters": {"type": "object", "properties": {"cities": {"type": "array", "description": "cities", "items": {"type": "string"}}}}}}]'

MESSAGES = [
    {
        "role": "user",
        "content": "What is the weather in Paris?"
    },
    {
        "role": "function",
        "content": "{\"name\": \"get_weather\", \"arguments\": {\"location\": \"Paris\", \"unit\": \"c\"}}"
    },
    {
        "role": "observation",
        "content": "{\"temperature\": 21, \"sky\": \"clear\"}"
    },
    {
        "role": "assistant",
        "content": "It is 21 °C and clear in Paris."
    },
    {
        "role": "user",
        "content": "And the time in Rome and Köln?"
    },
    {
        "role": "function",
        "content": "[{\"name\": \"get_time\", \"arguments\": {\"cities\": [\"Rome\"]}}, {\"name\": \"get_time\", \"arguments\": {\"cities\": [\"Köln\"]}}]"
    }
]

# (template, system) -> [(prompt, response), ...] per turn
GOLDEN = {
    ('default', 'You are a weather bot.'): [
        ('System: You are a weather bot.You have access to the following tools:\n> Tool Name: get_weather\nTool Description: Météo for a city\nTool Args:\n  - location (string, required): the city\n  - unit (string): degrees, should be one of [c, f]\n\n> Tool Name: get_time\nTool Description: the local time\nTool Args:\n  - cities (array): cities, where each item should be string\n\nUse the following format if using a tool:\n```\nAction: tool name (one of [get_weather, get_time])\nAction Input: the input to the tool, in a JSON format representing the kwargs (e.g. ```{"input": "hello world", "num_beams": 5}```)\n```\n{eos}\nHuman: What is the weather in Paris?{eos}\nAssistant:',
         'Action: get_weather\nAction Input: {"location": "Paris", "unit": "c"}{eos}\n'),
        ('Human: {"temperature": 21, "sky": "clear"}{eos}\nAssistant:',
         'It is 21 °C and clear in Paris.{eos}\n'),
        ('Human: And the time in Rome and Köln?{eos}\nAssistant:',
         'Action: get_time\nAction Input: {"cities": ["Rome"]}\nAction: get_time\nAction Input: {"cities": ["Köln"]}{eos}\n'),
    ],
    ('chatml', ''): [
        ('<|im_start|>system\nYou have access to the following tools:\n> Tool Name: get_weather\nTool Description: Météo for a city\nTool Args:\n  - location (string, required): the city\n  - unit (string): degrees, should be one of [c, f]\n\n> Tool Name: get_time\nTool Description: the local time\nTool Args:\n  - cities (array): cities, where each item should be string\n\nUse the following format if using a tool:\n```\nAction: tool name (one of [get_weather, get_time])\nAction Input: the input to the tool, in a JSON format representing the kwargs (e.g. ```{"input": "hello world", "num_beams": 5}```)\n```\n<|im_end|>\n<|im_start|>user\nWhat is the weather in Paris?<|im_end|>\n<|im_start|>assistant\n',
         'Action: get_weather\nAction Input: {"location": "Paris", "unit": "c"}<|im_end|>\n'),
        ('<|im_start|>tool\n{"temperature": 21, "sky": "clear"}<|im_end|>\n<|im_start|>assistant\n',
         'It is 21 °C and clear in Paris.<|im_end|>\n'),
        ('<|im_start|>user\nAnd the time in Rome and Köln?<|im_end|>\n<|im_start|>assistant\n',
         'Action: get_time\nAction Input: {"cities": ["Rome"]}\nAction: get_time\nAction Input: {"cities": ["Köln"]}<|im_end|>\n'),
    ],
    ('empty', 'You are a weather bot.'): [
        ('You are a weather bot.You have access to the following tools:\n> Tool Name: get_weather\nTool Description: Météo for a city\nTool Args:\n  - location (string, required): the city\n  - unit (string): degrees, should be one of [c, f]\n\n> Tool Name: get_time\nTool Description: the local time\nTool Args:\n  - cities (array): cities, where each item should be string\n\nUse the following format if using a tool:\n```\nAction: tool name (one of [get_weather, get_time])\nAction Input: the input to the tool, in a JSON format representing the kwargs (e.g. ```{"input": "hello world", "num_beams": 5}```)\n```\nWhat is the weather in Paris?',
         'Action: get_weather\nAction Input: {"location": "Paris", "unit": "c"}'),
        ('{"temperature": 21, "sky": "clear"}',
         'It is 21 °C and clear in Paris.'),
        ('And the time in Rome and Köln?',
         'Action: get_time\nAction Input: {"cities": ["Rome"]}\nAction: get_time\nAction Input: {"cities": ["Köln"]}'),
    ],
    ('llama3', 'You are a weather bot.'): [
        ('{bos}<|start_header_id|>system<|end_header_id|>\n\nYou are a weather bot.Cutting Knowledge Date: December 2023\nToday Date: {date}\n\nYou have access to the following functions. To call a function, please respond with JSON for a function call. Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}. Do not use variables.\n\n{\n    "type": "function",\n    "function": {\n        "name": "get_weather",\n        "description": "Météo for a city",\n        "parameters": {\n            "type": "object",\n            "properties": {\n                "location": {\n                    "type": "string",\n                    "description": "the city"\n                },\n                "unit": {\n                    "type": "string",\n                    "description": "degrees",\n                    "enum": [\n                        "c",\n                        "f"\n                    ]\n                }\n            },\n            "required": [\n                "location"\n            ]\n        }\n    }\n}\n\n{\n    "type": "function",\n    "function": {\n        "name": "get_time",\n        "description": "the local time",\n        "parameters": {\n            "type": "object",\n            "properties": {\n                "cities": {\n                    "type": "array",\n                    "description": "cities",\n                    "items": {\n                        "type": "string"\n                    }\n                }\n            }\n        }\n    }\n}\n\n<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nWhat is the weather in Paris?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n',
         '{"name": "get_weather", "parameters": {"location": "Paris", "unit": "c"}}<|eot_id|>'),
        ('<|start_header_id|>ipython<|end_header_id|>\n\n{"temperature": 21, "sky": "clear"}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n',
         'It is 21 °C and clear in Paris.<|eot_id|>'),
        ('<|start_header_id|>user<|end_header_id|>\n\nAnd the time in Rome and Köln?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n',
         '[{"name": "get_time", "parameters": {"cities": ["Rome"]}}, {"name": "get_time", "parameters": {"cities": ["Köln"]}}]<|eot_id|>'),
    ],
    ('qwen', ''): [
        ('<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{"type": "function", "function": {"name": "get_weather", "description": "Météo for a city", "parameters": {"type": "object", "properties": {"location": {"type": "string", "description": "the city"}, "unit": {"type": "string", "description": "degrees", "enum": ["c", "f"]}}, "required": ["location"]}}}\n{"type": "function", "function": {"name": "get_time", "description": "the local time", "parameters": {"type": "object", "properties": {"cities": {"type": "array", "description": "cities", "items": {"type": "string"}}}}}}\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n<|im_start|>user\nWhat is the weather in Paris?<|im_end|>\n<|im_start|>assistant\n',
         '<tool_call>\n{"name": "get_weather", "arguments": {"location": "Paris", "unit": "c"}}\n</tool_call><|im_end|>\n'),
        ('<|im_start|>user\n<tool_response>\n{"temperature": 21, "sky": "clear"}\n</tool_response><|im_end|>\n<|im_start|>assistant\n',
         'It is 21 °C and clear in Paris.<|im_end|>\n'),
        ('<|im_start|>user\nAnd the time in Rome and Köln?<|im_end|>\n<|im_start|>assistant\n',
         '<tool_call>\n{"name": "get_time", "arguments": {"cities": ["Rome"]}}\n</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"cities": ["Köln"]}}\n</tool_call><|im_end|>\n'),
    ],
    ('qwen3', 'You are a weather bot.'): [
        ('<|im_start|>system\nYou are a weather bot.\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{"type": "function", "function": {"name": "get_weather", "description": "Météo for a city", "parameters": {"type": "object", "properties": {"location": {"type": "string", "description": "the city"}, "unit": {"type": "string", "description": "degrees", "enum": ["c", "f"]}}, "required": ["location"]}}}\n{"type": "function", "function": {"name": "get_time", "description": "the local time", "parameters": {"type": "object", "properties": {"cities": {"type": "array", "description": "cities", "items": {"type": "string"}}}}}}\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n<|im_start|>user\nWhat is the weather in Paris?<|im_end|>\n<|im_start|>assistant\n',
         '<think>\n\n</think>\n\n<tool_call>\n{"name": "get_weather", "arguments": {"location": "Paris", "unit": "c"}}\n</tool_call><|im_end|>\n'),
        ('<|im_start|>user\n<tool_response>\n{"temperature": 21, "sky": "clear"}\n</tool_response><|im_end|>\n<|im_start|>assistant\n',
         '<think>\n\n</think>\n\nIt is 21 °C and clear in Paris.<|im_end|>\n'),
        ('<|im_start|>user\nAnd the time in Rome and Köln?<|im_end|>\n<|im_start|>assistant\n',
         '<think>\n\n</think>\n\n<tool_call>\n{"name": "get_time", "arguments": {"cities": ["Rome"]}}\n</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"cities": ["Köln"]}}\n</tool_call><|im_end|>\n'),
    ],
    ('qwen3_nothink', ''): [
        ('<|im_start|>system\n\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{"type": "function", "function": {"name": "get_weather", "description": "Météo for a city", "parameters": {"type": "object", "properties": {"location": {"type": "string", "description": "the city"}, "unit": {"type": "string", "description": "degrees", "enum": ["c", "f"]}}, "required": ["location"]}}}\n{"type": "function", "function": {"name": "get_time", "description": "the local time", "parameters": {"type": "object", "properties": {"cities": {"type": "array", "description": "cities", "items": {"type": "string"}}}}}}\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n<|im_start|>user\nWhat is the weather in Paris?<|im_end|>\n<|im_start|>assistant\n',
         '<tool_call>\n{"name": "get_weather", "arguments": {"location": "Paris", "unit": "c"}}\n</tool_call><|im_end|>\n'),
        ('<|im_start|>user\n<tool_response>\n{"temperature": 21, "sky": "clear"}\n</tool_response><|im_end|>\n<|im_start|>assistant\n',
         'It is 21 °C and clear in Paris.<|im_end|>\n'),
        ('<|im_start|>user\nAnd the time in Rome and Köln?<|im_end|>\n<|im_start|>assistant\n',
         '<tool_call>\n{"name": "get_time", "arguments": {"cities": ["Rome"]}}\n</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"cities": ["Köln"]}}\n</tool_call><|im_end|>\n'),
    ],
    # llama2 and mistral: added with the same stand-in tokenizer, LLaMA-Factory 0.9.5's wheel imported with its
    # media libraries stubbed out (template.py does not use them)
    ('llama2', 'You are a weather bot.'): [
        ('{bos}[INST] <<SYS>>\nYou are a weather bot.You have access to the following tools:\n> Tool Name: get_weather\nTool Description: Météo for a city\nTool Args:\n  - location (string, required): the city\n  - unit (string): degrees, should be one of [c, f]\n\n> Tool Name: get_time\nTool Description: the local time\nTool Args:\n  - cities (array): cities, where each item should be string\n\nUse the following format if using a tool:\n```\nAction: tool name (one of [get_weather, get_time])\nAction Input: the input to the tool, in a JSON format representing the kwargs (e.g. ```{"input": "hello world", "num_beams": 5}```)\n```\n\n<</SYS>>\n\nWhat is the weather in Paris? [/INST]',
         'Action: get_weather\nAction Input: {"location": "Paris", "unit": "c"}{eos}'),
        ('{bos}[INST] {"temperature": 21, "sky": "clear"} [/INST]',
         'It is 21 °C and clear in Paris.{eos}'),
        ('{bos}[INST] And the time in Rome and Köln? [/INST]',
         'Action: get_time\nAction Input: {"cities": ["Rome"]}\nAction: get_time\nAction Input: {"cities": ["Köln"]}{eos}'),
    ],
    ('mistral', 'You are a weather bot.'): [
        ('{bos}[INST] You are a weather bot.[AVAILABLE_TOOLS] [{"type": "function", "function": {"name": "get_weather", "description": "Météo for a city", "parameters": {"type": "object", "properties": {"location": {"type": "string", "description": "the city"}, "unit": {"type": "string", "description": "degrees", "enum": ["c", "f"]}}, "required": ["location"]}}}, {"type": "function", "function": {"name": "get_time", "description": "the local time", "parameters": {"type": "object", "properties": {"cities": {"type": "array", "description": "cities", "items": {"type": "string"}}}}}}][/AVAILABLE_TOOLS]\n\nWhat is the weather in Paris?[/INST]',
         '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"location": "Paris", "unit": "c"}}]{eos}'),
        ('[TOOL_RESULTS] {"content": {"temperature": 21, "sky": "clear"}}[/TOOL_RESULTS]',
         ' It is 21 °C and clear in Paris.{eos}'),
        ('[INST] And the time in Rome and Köln?[/INST]',
         '[TOOL_CALLS] [{"name": "get_time", "arguments": {"cities": ["Rome"]}}, {"name": "get_time", "arguments": {"cities": ["Köln"]}}]{eos}'),
    ],
    ('mistral', ''): [
        ('{bos}[INST] [AVAILABLE_TOOLS] [{"type": "function", "function": {"name": "get_weather", "description": "Météo for a city", "parameters": {"type": "object", "properties": {"location": {"type": "string", "description": "the city"}, "unit": {"type": "string", "description": "degrees", "enum": ["c", "f"]}}, "required": ["location"]}}}, {"type": "function", "function": {"name": "get_time", "description": "the local time", "parameters": {"type": "object", "properties": {"cities": {"type": "array", "description": "cities", "items": {"type": "string"}}}}}}][/AVAILABLE_TOOLS]\n\nWhat is the weather in Paris?[/INST]',
         '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"location": "Paris", "unit": "c"}}]{eos}'),
        ('[TOOL_RESULTS] {"content": {"temperature": 21, "sky": "clear"}}[/TOOL_RESULTS]',
         ' It is 21 °C and clear in Paris.{eos}'),
        ('[INST] And the time in Rome and Köln?[/INST]',
         '[TOOL_CALLS] [{"name": "get_time", "arguments": {"cities": ["Rome"]}}, {"name": "get_time", "arguments": {"cities": ["Köln"]}}]{eos}'),
    ],
}

# A function_call turn carrying a thought, or a call wrapped in <tool_call> words, after the user's "Weather in
# Paris?" with tools "[]" and no system: (kind, template, enable_thinking) -> (turn content, (prompt, response)).
THOUGHTS = {
    ('thought', 'qwen3', True): ('<think>\nI need the weather.\n</think>\n\n{"name": "get_weather", "arguments": {"location": "Paris"}}',
        ('<|im_start|>system\n<|im_end|>\n<|im_start|>user\nWeather in Paris?<|im_end|>\n<|im_start|>assistant\n',
         '<think>\nI need the weather.\n</think>\n\n<tool_call>\n{"name": "get_weather", "arguments": {"location": "Paris"}}\n</tool_call><|im_end|>\n')),
    ('thought', 'qwen3', False): ('<think>\nI need the weather.\n</think>\n\n{"name": "get_weather", "arguments": {"location": "Paris"}}',
        ('<|im_start|>system\n<|im_end|>\n<|im_start|>user\nWeather in Paris?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n',
         '<tool_call>\n{"name": "get_weather", "arguments": {"location": "Paris"}}\n</tool_call><|im_end|>\n')),
    ('thought', 'default', True): ('<think>\nI need the weather.\n</think>\n\n{"name": "get_weather", "arguments": {"location": "Paris"}}',
        ('System: {eos}\nHuman: Weather in Paris?{eos}\nAssistant:',
         '<think>\nI need the weather.\n</think>\n\nAction: get_weather\nAction Input: {"location": "Paris"}{eos}\n')),
    ('thought', 'default', False): ('<think>\nI need the weather.\n</think>\n\n{"name": "get_weather", "arguments": {"location": "Paris"}}',
        ('System: {eos}\nHuman: Weather in Paris?{eos}\nAssistant:',
         '<think>\nI need the weather.\n</think>\n\nAction: get_weather\nAction Input: {"location": "Paris"}{eos}\n')),
    ('wrapped', 'qwen3', True): ('Let me check. <tool_call>{"name": "get_weather", "arguments": {"location": "Paris"}}</tool_call>',
        ('<|im_start|>system\n<|im_end|>\n<|im_start|>user\nWeather in Paris?<|im_end|>\n<|im_start|>assistant\n',
         '<think>\n\n</think>\n\nLet me check. <tool_call>\n{"name": "get_weather", "arguments": {"location": "Paris"}}\n</tool_call><|im_end|>\n')),
    ('wrapped', 'qwen3', False): ('Let me check. <tool_call>{"name": "get_weather", "arguments": {"location": "Paris"}}</tool_call>',
        ('<|im_start|>system\n<|im_end|>\n<|im_start|>user\nWeather in Paris?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n',
         'Let me check. <tool_call>\n{"name": "get_weather", "arguments": {"location": "Paris"}}\n</tool_call><|im_end|>\n')),
    ('wrapped', 'default', True): ('Let me check. <tool_call>{"name": "get_weather", "arguments": {"location": "Paris"}}</tool_call>',
        ('System: {eos}\nHuman: Weather in Paris?{eos}\nAssistant:',
         'Let me check. Action: get_weather\nAction Input: {"location": "Paris"}{eos}\n')),
    ('wrapped', 'default', False): ('Let me check. <tool_call>{"name": "get_weather", "arguments": {"location": "Paris"}}</tool_call>',
        ('System: {eos}\nHuman: Weather in Paris?{eos}\nAssistant:',
         'Let me check. Action: get_weather\nAction Input: {"location": "Paris"}{eos}\n')),
}
