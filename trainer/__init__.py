"""The online side: a lean single-model PACT trainer that streams a pact-cache."""
