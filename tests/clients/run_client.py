"""Third-party SageMaker clients, used exactly as their documentation shows, against a local server.

Run by the client suite with the interpreter of ``.venv-clients`` (never imported by pytest)::

    python tests/clients/run_client.py langchain URL TEXT...
    python tests/clients/run_client.py llama-index ENDPOINT_NAME TEXT...   # URL from AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME

Prints one JSON object: ``{"documents": [[float]...], "query": [float]}`` (the first text is also
embedded as the query). Credentials and region come from the environment (dummy ones; the URL is
loopback).
"""

from __future__ import annotations

import json
import sys


def langchain(url: str, texts: list[str]) -> dict:
    import boto3
    from langchain_community.embeddings import SagemakerEndpointEmbeddings
    from langchain_community.embeddings.sagemaker_endpoint import EmbeddingsContentHandler

    class ContentHandler(EmbeddingsContentHandler):  # as LangChain's SageMaker page writes it
        content_type = "application/json"
        accepts = "application/json"

        def transform_input(self, inputs: list[str], model_kwargs: dict) -> bytes:
            return json.dumps({"inputs": inputs, **model_kwargs}).encode("utf-8")

        def transform_output(self, output) -> list[list[float]]:
            return json.loads(output.read().decode("utf-8"))["embeddings"]

    client = boto3.client("sagemaker-runtime", endpoint_url=url)
    embeddings = SagemakerEndpointEmbeddings(
        endpoint_name="my-embeddings", client=client, content_handler=ContentHandler()
    )
    return {"documents": embeddings.embed_documents(texts), "query": embeddings.embed_query(texts[0])}


def llama_index(endpoint_name: str, texts: list[str]) -> dict:
    from llama_index.embeddings.sagemaker_endpoint import SageMakerEmbedding

    model = SageMakerEmbedding(endpoint_name=endpoint_name, max_retries=0)  # the default IOHandler
    return {
        "documents": model.get_text_embedding_batch(texts),
        "query": model.get_query_embedding(texts[0]),
    }


def main(argv: list[str]) -> int:
    kind, target, *texts = argv
    run = {"langchain": langchain, "llama-index": llama_index}[kind]
    json.dump(run(target, texts), sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
