//! Variant (g): an Envoy Lua filter doing the same API-key check as Tollgate and the
//! auth service — SHA-256 of the presented key, looked up among the stored digests.
//! Envoy's Lua API has no hash function, so SHA-256 is written out in LuaJIT with
//! its `bit` library. (The table lookup is not constant time; this variant measures
//! cost, it is not a recommendation.)

/// The Lua source with the digest table `(sha256 hex, user, groups csv)` inlined.
pub fn source(keys: &[(String, String, String)]) -> String {
    let mut table = String::from("local KEYS = {\n");
    for (digest, user, groups) in keys {
        // Digests are hex, users and groups our own ASCII names: Rust's `{:?}` quoting
        // reads the same in Lua.
        table.push_str(&format!("  [\"{}\"] = {{ user = {:?}, groups = {:?} }},\n", digest, user, groups));
    }
    table.push_str("}\n");
    format!("{table}{SHA256_AND_FILTER}")
}

const SHA256_AND_FILTER: &str = r#"
local bit = require("bit")
local band, bor, bxor, bnot = bit.band, bit.bor, bit.bxor, bit.bnot
local rshift, lshift, ror, tobit, tohex = bit.rshift, bit.lshift, bit.ror, bit.tobit, bit.tohex
local byte, char, rep = string.byte, string.char, string.rep

local K = {
  0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
  0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
  0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
  0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
  0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
  0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
  0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
  0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
}
for i = 1, 64 do K[i] = tobit(K[i]) end

local W = {}

local function sha256_hex(msg)
  local ml = #msg
  local bits = ml * 8
  msg = msg .. "\128" .. rep("\0", (55 - ml) % 64) .. "\0\0\0\0"
    .. char(band(rshift(bits, 24), 255), band(rshift(bits, 16), 255), band(rshift(bits, 8), 255), band(bits, 255))
  local h0, h1, h2, h3 = tobit(0x6a09e667), tobit(0xbb67ae85), tobit(0x3c6ef372), tobit(0xa54ff53a)
  local h4, h5, h6, h7 = tobit(0x510e527f), tobit(0x9b05688c), tobit(0x1f83d9ab), tobit(0x5be0cd19)
  for off = 1, #msg, 64 do
    for i = 0, 15 do
      local p = off + i * 4
      local b0, b1, b2, b3 = byte(msg, p, p + 3)
      W[i] = bor(lshift(b0, 24), lshift(b1, 16), lshift(b2, 8), b3)
    end
    for i = 16, 63 do
      local x, y = W[i - 15], W[i - 2]
      local s0 = bxor(ror(x, 7), ror(x, 18), rshift(x, 3))
      local s1 = bxor(ror(y, 17), ror(y, 19), rshift(y, 10))
      W[i] = tobit(W[i - 16] + s0 + W[i - 7] + s1)
    end
    local a, b, c, d, e, f, g, h = h0, h1, h2, h3, h4, h5, h6, h7
    for i = 0, 63 do
      local S1 = bxor(ror(e, 6), ror(e, 11), ror(e, 25))
      local ch = bxor(band(e, f), band(bnot(e), g))
      local t1 = h + S1 + ch + K[i + 1] + W[i]
      local S0 = bxor(ror(a, 2), ror(a, 13), ror(a, 22))
      local maj = bxor(band(a, b), band(a, c), band(b, c))
      h, g, f, e, d, c, b, a = g, f, e, tobit(d + t1), c, b, a, tobit(t1 + S0 + maj)
    end
    h0, h1, h2, h3 = tobit(h0 + a), tobit(h1 + b), tobit(h2 + c), tobit(h3 + d)
    h4, h5, h6, h7 = tobit(h4 + e), tobit(h5 + f), tobit(h6 + g), tobit(h7 + h)
  end
  return tohex(h0) .. tohex(h1) .. tohex(h2) .. tohex(h3) .. tohex(h4) .. tohex(h5) .. tohex(h6) .. tohex(h7)
end

local DENY_BODY = '{"error": {"message": "Incorrect API key provided.", "type": "invalid_request_error", "param": null, "code": "invalid_api_key"}}'

function envoy_on_request(handle)
  local headers = handle:headers()
  headers:remove("x-tollgate-user")
  headers:remove("x-tollgate-groups")
  local key
  local auth = headers:get("authorization")
  if auth ~= nil and auth:sub(1, 7) == "Bearer " then
    key = auth:sub(8)
  else
    key = headers:get("x-api-key")
  end
  local ident = nil
  if key ~= nil and #key > 0 then
    ident = KEYS[sha256_hex(key)]
  end
  if ident == nil then
    handle:respond({[":status"] = "401", ["content-type"] = "application/json",
                    ["www-authenticate"] = 'Bearer realm="tollgate"'}, DENY_BODY)
    return
  end
  headers:remove("authorization")
  headers:remove("x-api-key")
  headers:replace("x-tollgate-user", ident.user)
  headers:replace("x-tollgate-groups", ident.groups)
end
"#;
