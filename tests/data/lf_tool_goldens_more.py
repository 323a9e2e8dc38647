"""Function-calling renderings by LLaMA-Factory 0.9.5 itself for the gemma family, glm4 / glmz1, phi4_mini and gpt_oss: literal
expected strings for tests/data/test_tool_formats_more.py, made as lf_tool_goldens.py's were (the 0.9.5 wheel's
llamafactory.data.template.TEMPLATES[name].encode_multiturn(tok, messages, system, tools) with a stand-in tokenizer
whose encode(text) returns [text], its media libraries stubbed out; obtained once, not at test time). "{bos}" / "{eos}"
mark the tokenizer's BOS / EOS. glm4 / glmz1 take ONE_CALL (GLM4ToolUtils refuses parallel calls); the others
lf_tool_goldens' MESSAGES, whose last turn is two parallel calls. Per turn: (prompt, response).
"""
# flake8: noqa: E501

from lf_tool_goldens import MESSAGES, TOOLS

# MESSAGES with one call (to get_time for two cities) as the last turn
ONE_CALL = MESSAGES[:5] + [{"role": "function", "content": '{"name": "get_time", "arguments": {"cities": ["Rome", "Köln"]}}'}]

# (template, system, tools) -> [(prompt, response), ...] per turn
GOLDEN = {
    ('gemma', 'You are a weather bot.', TOOLS): [
        ('{bos}<start_of_turn>user\nYou are a weather bot.You have access to the following tools:\n> Tool Name: get_weather\nTool Description: Météo for a city\nTool Args:\n  - location (string, required): the city\n  - unit (string): degrees, should be one of [c, f]\n\n> Tool Name: get_time\nTool Description: the local time\nTool Args:\n  - cities (array): cities, where each item should be string\n\nUse the following format if using a tool:\n```\nAction: tool name (one of [get_weather, get_time])\nAction Input: the input to the tool, in a JSON format representing the kwargs (e.g. ```{"input": "hello world", "num_beams": 5}```)\n```\n\n\nWhat is the weather in Paris?<end_of_turn>\n<start_of_turn>model\n',
         'Action: get_weather\nAction Input: {"location": "Paris", "unit": "c"}<end_of_turn>\n'),
        ('<start_of_turn>tool\n{"temperature": 21, "sky": "clear"}<end_of_turn>\n<start_of_turn>model\n',
         'It is 21 °C and clear in Paris.<end_of_turn>\n'),
        ('<start_of_turn>user\nAnd the time in Rome and Köln?<end_of_turn>\n<start_of_turn>model\n',
         'Action: get_time\nAction Input: {"cities": ["Rome"]}\nAction: get_time\nAction Input: {"cities": ["Köln"]}<end_of_turn>\n'),
    ],
    ('gemma2', '', TOOLS): [
        ('{bos}<start_of_turn>user\nYou have access to the following tools:\n> Tool Name: get_weather\nTool Description: Météo for a city\nTool Args:\n  - location (string, required): the city\n  - unit (string): degrees, should be one of [c, f]\n\n> Tool Name: get_time\nTool Description: the local time\nTool Args:\n  - cities (array): cities, where each item should be string\n\nUse the following format if using a tool:\n```\nAction: tool name (one of [get_weather, get_time])\nAction Input: the input to the tool, in a JSON format representing the kwargs (e.g. ```{"input": "hello world", "num_beams": 5}```)\n```\n\n\nWhat is the weather in Paris?<end_of_turn>\n<start_of_turn>model\n',
         'Action: get_weather\nAction Input: {"location": "Paris", "unit": "c"}<end_of_turn>\n'),
        ('<start_of_turn>tool\n{"temperature": 21, "sky": "clear"}<end_of_turn>\n<start_of_turn>model\n',
         'It is 21 °C and clear in Paris.<end_of_turn>\n'),
        ('<start_of_turn>user\nAnd the time in Rome and Köln?<end_of_turn>\n<start_of_turn>model\n',
         'Action: get_time\nAction Input: {"cities": ["Rome"]}\nAction: get_time\nAction Input: {"cities": ["Köln"]}<end_of_turn>\n'),
    ],
    ('phi4_mini', 'You are a weather bot.', TOOLS): [
        ('<|system|>You are a weather bot.<|tool|>[{"name": "get_weather", "description": "Météo for a city", "parameters": {"type": "object", "properties": {"location": {"type": "string", "description": "the city"}, "unit": {"type": "string", "description": "degrees", "enum": ["c", "f"]}}, "required": ["location"]}}, {"type": "function", "function": {"name": "get_time", "description": "the local time", "parameters": {"type": "object", "properties": {"cities": {"type": "array", "description": "cities", "items": {"type": "string"}}}}}}]<|/tool|><|end|><|user|>What is the weather in Paris?<|end|><|assistant|>',
         'Action: get_weather\nAction Input: {"location": "Paris", "unit": "c"}<|end|>'),
        ('<|user|>{"temperature": 21, "sky": "clear"}<|end|><|assistant|>',
         'It is 21 °C and clear in Paris.<|end|>'),
        ('<|user|>And the time in Rome and Köln?<|end|><|assistant|>',
         'Action: get_time\nAction Input: {"cities": ["Rome"]}\nAction: get_time\nAction Input: {"cities": ["Köln"]}<|end|>'),
    ],
    ('phi4_mini', '', '[]'): [
        ('<|system|><|tool|>[]<|/tool|><|end|><|user|>What is the weather in Paris?<|end|><|assistant|>',
         'Action: get_weather\nAction Input: {"location": "Paris", "unit": "c"}<|end|>'),
        ('<|user|>{"temperature": 21, "sky": "clear"}<|end|><|assistant|>',
         'It is 21 °C and clear in Paris.<|end|>'),
        ('<|user|>And the time in Rome and Köln?<|end|><|assistant|>',
         'Action: get_time\nAction Input: {"cities": ["Rome"]}\nAction: get_time\nAction Input: {"cities": ["Köln"]}<|end|>'),
    ],
    ('glm4', 'You are a weather bot.', TOOLS): [
        ('[gMASK]<sop><|system|>\nYou are a weather bot.你是一个名为 ChatGLM 的人工智能助手。你是基于智谱 AI 公司训练的语言模型 GLM-4 模型开发的，你的任务是针对用户的问题和要求提供适当的答复和支持。\n\n# 可用工具\n\n## get_weather\n\n{\n    "name": "get_weather",\n    "description": "Météo for a city",\n    "parameters": {\n        "type": "object",\n        "properties": {\n            "location": {\n                "type": "string",\n                "description": "the city"\n            },\n            "unit": {\n                "type": "string",\n                "description": "degrees",\n                "enum": [\n                    "c",\n                    "f"\n                ]\n            }\n        },\n        "required": [\n            "location"\n        ]\n    }\n}\n在调用上述函数时，请使用 Json 格式表示调用的参数。\n\n## get_time\n\n{\n    "name": "get_time",\n    "description": "the local time",\n    "parameters": {\n        "type": "object",\n        "properties": {\n            "cities": {\n                "type": "array",\n                "description": "cities",\n                "items": {\n                    "type": "string"\n                }\n            }\n        }\n    }\n}\n在调用上述函数时，请使用 Json 格式表示调用的参数。<|user|>\nWhat is the weather in Paris?<|assistant|>',
         'get_weather\n{"location": "Paris", "unit": "c"}'),
        ('<|observation|>\n{"temperature": 21, "sky": "clear"}<|assistant|>',
         '\nIt is 21 °C and clear in Paris.'),
        ('<|user|>\nAnd the time in Rome and Köln?<|assistant|>',
         'get_time\n{"cities": ["Rome", "Köln"]}'),
    ],
    ('glm4', '', TOOLS): [
        ('[gMASK]<sop><|system|>\n你是一个名为 ChatGLM 的人工智能助手。你是基于智谱 AI 公司训练的语言模型 GLM-4 模型开发的，你的任务是针对用户的问题和要求提供适当的答复和支持。\n\n# 可用工具\n\n## get_weather\n\n{\n    "name": "get_weather",\n    "description": "Météo for a city",\n    "parameters": {\n        "type": "object",\n        "properties": {\n            "location": {\n                "type": "string",\n                "description": "the city"\n            },\n            "unit": {\n                "type": "string",\n                "description": "degrees",\n                "enum": [\n                    "c",\n                    "f"\n                ]\n            }\n        },\n        "required": [\n            "location"\n        ]\n    }\n}\n在调用上述函数时，请使用 Json 格式表示调用的参数。\n\n## get_time\n\n{\n    "name": "get_time",\n    "description": "the local time",\n    "parameters": {\n        "type": "object",\n        "properties": {\n            "cities": {\n                "type": "array",\n                "description": "cities",\n                "items": {\n                    "type": "string"\n                }\n            }\n        }\n    }\n}\n在调用上述函数时，请使用 Json 格式表示调用的参数。<|user|>\nWhat is the weather in Paris?<|assistant|>',
         'get_weather\n{"location": "Paris", "unit": "c"}'),
        ('<|observation|>\n{"temperature": 21, "sky": "clear"}<|assistant|>',
         '\nIt is 21 °C and clear in Paris.'),
        ('<|user|>\nAnd the time in Rome and Köln?<|assistant|>',
         'get_time\n{"cities": ["Rome", "Köln"]}'),
    ],
    ('glmz1', '', TOOLS): [
        ('[gMASK]<sop><|system|>\n你是一个名为 ChatGLM 的人工智能助手。你是基于智谱 AI 公司训练的语言模型 GLM-4 模型开发的，你的任务是针对用户的问题和要求提供适当的答复和支持。\n\n# 可用工具\n\n## get_weather\n\n{\n    "name": "get_weather",\n    "description": "Météo for a city",\n    "parameters": {\n        "type": "object",\n        "properties": {\n            "location": {\n                "type": "string",\n                "description": "the city"\n            },\n            "unit": {\n                "type": "string",\n                "description": "degrees",\n                "enum": [\n                    "c",\n                    "f"\n                ]\n            }\n        },\n        "required": [\n            "location"\n        ]\n    }\n}\n在调用上述函数时，请使用 Json 格式表示调用的参数。\n\n## get_time\n\n{\n    "name": "get_time",\n    "description": "the local time",\n    "parameters": {\n        "type": "object",\n        "properties": {\n            "cities": {\n                "type": "array",\n                "description": "cities",\n                "items": {\n                    "type": "string"\n                }\n            }\n        }\n    }\n}\n在调用上述函数时，请使用 Json 格式表示调用的参数。<|user|>\nWhat is the weather in Paris?<|assistant|>',
         '<think>\n\n</think>\n\nget_weather\n{"location": "Paris", "unit": "c"}'),
        ('<|observation|>\n{"temperature": 21, "sky": "clear"}<|assistant|>',
         '<think>\n\n</think>\n\n\nIt is 21 °C and clear in Paris.'),
        ('<|user|>\nAnd the time in Rome and Köln?<|assistant|>',
         '<think>\n\n</think>\n\nget_time\n{"cities": ["Rome", "Köln"]}'),
    ],
}
# gemma3 (template.py:997-1011, "copied from gemma template"): llamafactory rendered it letter for letter as gemma2
GOLDEN[("gemma3", "", TOOLS)] = GOLDEN[("gemma2", "", TOOLS)]
# gpt_oss (template.py:1194-1203): no format_tools / format_function / format_observation, so register_template's
# defaults (:534-550) as for the gemma family: the default tool format, a call in the answer's block, a tool result as a
# user turn; ReasoningTemplate puts the empty analysis-channel thought in front of every response (call or answer)
GOLDEN[('gpt_oss', '', TOOLS)] = [
    ('<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.You have access to the following tools:\n> Tool Name: get_weather\nTool Description: Météo for a city\nTool Args:\n  - location (string, required): the city\n  - unit (string): degrees, should be one of [c, f]\n\n> Tool Name: get_time\nTool Description: the local time\nTool Args:\n  - cities (array): cities, where each item should be string\n\nUse the following format if using a tool:\n```\nAction: tool name (one of [get_weather, get_time])\nAction Input: the input to the tool, in a JSON format representing the kwargs (e.g. ```{"input": "hello world", "num_beams": 5}```)\n```\n<|end|><|start|>user<|message|>What is the weather in Paris?<|end|><|start|>assistant',
     '<|channel|>analysis<|message|><|end|><|start|>assistant<|channel|>final<|message|>Action: get_weather\nAction Input: {"location": "Paris", "unit": "c"}'),
    ('<|start|>user<|message|>{"temperature": 21, "sky": "clear"}<|end|><|start|>assistant',
     '<|channel|>analysis<|message|><|end|><|start|>assistant<|channel|>final<|message|>It is 21 °C and clear in Paris.'),
    ('<|start|>user<|message|>And the time in Rome and Köln?<|end|><|start|>assistant',
     '<|channel|>analysis<|message|><|end|><|start|>assistant<|channel|>final<|message|>Action: get_time\nAction Input: {"cities": ["Rome"]}\nAction: get_time\nAction Input: {"cities": ["Köln"]}'),
]
