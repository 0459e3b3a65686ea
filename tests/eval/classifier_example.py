"""A toy safety classifier for the tests' --classifier module:callable."""


def flags_knives(prompt: str, response: str) -> bool:
    return "knife" in response.lower()
