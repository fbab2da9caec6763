#!/usr/bin/env bash
# Writes the seed corpora of the fuzz targets (fuzz/seeds/<target>/), a few small
# valid inputs each so libFuzzer starts from the interesting paths. The output is
# committed; rerun after changing this script. `make fuzz` reads them read-only and
# keeps what it discovers in fuzz/corpus/<target>/ (not committed).
set -euo pipefail
cd "$(dirname "$0")"

# Istio's HS256 dev guide: the secret is these 64 ASCII characters, used as raw bytes.
SECRET=f59f73eff3357c3754b9b60671f16ffcec9b1a301498fa18c928bb753d4b385a
TOKEN=eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCIsImtpZCI6ImRldi1rZXkifQ.eyJpc3MiOiJkZXYiLCJzdWIiOiJkZXYtdXNlciJ9.S6AKJ6CRs5nbrhHPshc2KnikNkjLp9isg6xlR4kSecQ
b64url() { base64 -w0 | tr '+/' '-_' | tr -d '='; }
K=$(printf %s "$SECRET" | b64url)

rm -rf jwt_verify credentials config_parse usage_stream
mkdir -p jwt_verify credentials config_parse usage_stream

# jwt_verify: the raw token (and, read as a token description, arbitrary bytes).
printf %s "$TOKEN" >jwt_verify/dev-token
printf %s "$(printf '{"alg":"none"}' | b64url).$(printf '{"iss":"dev","sub":"a"}' | b64url)." >jwt_verify/alg-none
printf %s "$(printf '{"alg":"HS256","kid":"dev-key"}' | b64url).$(printf '{"iss":"dev","sub":"a","exp":1700000100,"groups":["free","premium"]}' | b64url).c2ln" >jwt_verify/claims-bad-sig

# credentials: header blocks, one `name: value` per line.
printf 'authorization: Bearer %s\nx-request-id: 1' "$TOKEN" >credentials/bearer-jwt
printf 'x-api-key: tg-fuzz-key\nx-tollgate-user: admin' >credentials/x-api-key
printf 'Authorization: APIKEY tg-fuzz-key\napikey: other' >credentials/apikey-scheme
printf 'x-token: Token tg-fuzz-key\nx-user: root' >credentials/custom-source
printf 'authorization: Bearer\n' >credentials/bare-scheme

# config_parse: plugin configurations.
cat >config_parse/full.json <<JSON
{"api_keys":{"sources":[{"header":"authorization","prefix":"Bearer "},{"header":"x-api-key"}],
 "keys":[{"sha256":"5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8","user":"mittens","groups":["premium"]}],
 "keys_env":"KEYS"},
 "jwt":{"providers":[{"issuer":"dev","audiences":["llm"],"jwks":"{\"keys\":[{\"kty\":\"oct\",\"kid\":\"dev-key\",\"alg\":\"HS256\",\"k\":\"$K\"}]}",
   "user_claim":"sub","groups_claim":"groups","clock_skew_seconds":60,"require_exp":true},
   {"issuer":"env","jwks_env":"JWKS"}],"cache_entries":16},
 "authorization":{"allowed_groups":["free","premium"]},
 "identity_headers":{"user":"x-user","groups":"x-groups"},
 "forward_credentials":false,
 "usage":{"cluster":"outbound|8080||usage-tracking.default.svc.cluster.local","authority":"usage-tracking","path":"/track",
   "timeout_ms":1000,"flush_interval_ms":500,"max_batch":500,"max_queue":10000,"max_attempts":30,"inject_include_usage":true}}
JSON
printf '{}' >config_parse/empty.json
printf '{"jwt":{"providers":[{"issuer":"d","jwks_env":"EMPTY"}]},"api_keys":{"keys_env":"BAD"}}' >config_parse/env-errors.json

# usage_stream: byte 0 = kind (1 = SSE, 0 = JSON) and cap, byte 1 = number of cut
# points, then 2 bytes per cut point, then the body.
{
  printf '\x01\x02\x20\x00\x55\x00'
  printf 'data: {"id":"c1","model":"m","choices":[{"delta":{"content":"Hi"}}],"usage":null}\n\n'
  printf 'data: {"id":"c1","model":"m","choices":[],"usage":{"prompt_tokens":9,"completion_tokens":2,"prompt_tokens_details":{"cached_tokens":4}}}\r\n\r\n'
  printf 'data: [DONE]\n\n'
} >usage_stream/sse-openai
{
  printf '\x01\x00'
  printf 'event: message_start\ndata: {"type":"message_start","message":{"model":"claude","usage":{"input_tokens":12,"output_tokens":1}}}\n\n'
  printf 'event: message_delta\ndata: {"type":"message_delta","usage":{"output_tokens":30}}\n\n'
} >usage_stream/sse-anthropic
{
  printf '\x00\x01\x10\x00'
  printf '{"id":"r","object":"response","response":{"model":"m","usage":{"input_tokens":5,"output_tokens":7,"output_tokens_details":{"reasoning_tokens":3}}}}'
} >usage_stream/json-response
printf '\x00\x00{"model":"m","stream":true,"messages":[{"role":"user","content":"hi"}]}' >usage_stream/inject
