// greet: a sluice function in JavaScript, built with componentize-js (no SDK).
//
// POST a JSON body like {"name": "Ada"}. It answers
// {"message": "<GREETING>, Ada!", "lang": "js", "upstream": ...}, where GREETING is an
// environment variable set at deploy (`sluice deploy --env GREETING=Hi`, default "Hello"), and
// "upstream" is what `GET $UPSTREAM_URL?name=Ada` answered (JSON, or text), when UPSTREAM_URL is
// set: its host must be in the function's allow list (`--allow-outbound HOST[:PORT]`).
//
// Errors are JSON, {"error": {"code": "...", "message": "..."}}: 405 for a method other than
// POST, 413 for a body over 64 KiB, 400 for a body that is not JSON, 422 for a missing or empty
// name, 502 when the upstream call fails (a host not allowed included).

import { getEnvironment } from "wasi:cli/environment@0.2.10";

const BODY_MAX = 64 * 1024;

class HttpError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

// StarlingMonkey turns each wasi:http/incoming-handler call into a service-worker fetch event.
addEventListener("fetch", (event) => event.respondWith(handle(event.request)));

async function handle(request) {
  let status = 200;
  let doc;
  try {
    doc = await greet(request);
  } catch (e) {
    if (!(e instanceof HttpError)) throw e;
    status = e.status;
    doc = { error: { code: e.code, message: e.message } };
  }
  return new Response(JSON.stringify(doc) + "\n", {
    status,
    headers: { "content-type": "application/json" },
  });
}

async function greet(request) {
  if (request.method !== "POST") {
    throw new HttpError(405, "method_not_allowed", 'send POST with a JSON body like {"name": "Ada"}');
  }
  const raw = await readAll(request, 413, "body_too_large");
  let doc;
  try {
    doc = JSON.parse(new TextDecoder("utf-8", { fatal: true }).decode(raw));
  } catch (e) {
    throw new HttpError(400, "invalid_json", `the body is not JSON: ${e.message}`);
  }
  const name = doc !== null && typeof doc === "object" && !Array.isArray(doc) ? doc.name : undefined;
  if (typeof name !== "string" || name.trim() === "") {
    throw new HttpError(422, "invalid_name", '"name" must be a non-empty string');
  }

  // Read at call time: the component's JS heap was initialized when it was built.
  const env = Object.fromEntries(getEnvironment());
  const result = { message: `${env.GREETING ?? "Hello"}, ${name}!`, lang: "js" };
  if (env.UPSTREAM_URL) {
    result.upstream = await lookup(env.UPSTREAM_URL, name);
  }
  return result;
}

// GET url?name=NAME; the status and body (parsed when it is JSON).
async function lookup(base, name) {
  // encodeURIComponent leaves !'()* alone; escape them too, as the other examples do.
  const encoded = encodeURIComponent(name).replace(/[!'()*]/g, (c) => `%${c.charCodeAt(0).toString(16).toUpperCase()}`);
  const url = `${base}${base.includes("?") ? "&" : "?"}name=${encoded}`;
  let response;
  let text;
  try {
    response = await fetch(url, { headers: { accept: "application/json" } });
    text = new TextDecoder().decode(await readAll(response, 502, "upstream_failed"));
  } catch (e) {
    if (e instanceof HttpError) throw e;
    // A host outside the allow list ends here (HTTP-request-denied), without a connection.
    throw new HttpError(502, "upstream_failed", `GET ${url}: ${e.message}`);
  }
  let body;
  try {
    body = JSON.parse(text);
  } catch {
    body = text;
  }
  return { url, status: response.status, body };
}

// The whole body of a request or response, refused past BODY_MAX.
async function readAll(message, status, code) {
  const chunks = [];
  let size = 0;
  if (message.body) {
    const reader = message.body.getReader();
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      size += value.length;
      if (size > BODY_MAX) throw new HttpError(status, code, `a body is at most ${BODY_MAX} bytes`);
      chunks.push(value);
    }
  }
  const all = new Uint8Array(size);
  let at = 0;
  for (const chunk of chunks) {
    all.set(chunk, at);
    at += chunk.length;
  }
  return all;
}
