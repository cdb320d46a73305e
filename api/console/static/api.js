// The console's only way to the service: the REST routes under /v1 (docs/api.md), the same
// calls the CLI makes through api/client.py. Errors carry the API's code and description.

const AUTH_KEY = "blockvault.console.auth";

export function currentAuth() {
  try {
    return JSON.parse(sessionStorage.getItem(AUTH_KEY) || "null");
  } catch {
    return null;
  }
}

export function saveAuth(auth) {
  if (auth) sessionStorage.setItem(AUTH_KEY, JSON.stringify(auth));
  else sessionStorage.removeItem(AUTH_KEY);
}

export class ApiError extends Error {
  constructor(status, code, description) {
    super(description);
    this.status = status;
    this.code = code;
  }
}

let unauthorized = () => {};
/** Called with the ApiError of any 401 on an authenticated call (expired session, revoked key). */
export function onUnauthorized(handler) {
  unauthorized = handler;
}

function url(path, query) {
  const target = new URL(path, window.location.origin);
  for (const [name, value] of Object.entries(query || {})) {
    if (value === undefined || value === null || value === "") continue;
    for (const item of Array.isArray(value) ? value : [value]) target.searchParams.append(name, String(item));
  }
  return target;
}

/** One call: {status, data}; throws ApiError with the API's message for any error answer. */
export async function call(method, path, { body, query, anonymous = false, token } = {}) {
  const headers = { Accept: "application/json" };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const auth = currentAuth();
  const credential = token || (!anonymous && auth && auth.token);
  if (credential) headers.Authorization = `Bearer ${credential}`;
  let response;
  try {
    response = await fetch(url(path, query), {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
    });
  } catch (error) {
    throw new ApiError(0, "UNREACHABLE", `the API does not answer: ${error.message}`);
  }
  let data = null;
  try {
    data = await response.json();
  } catch {
    data = null;
  }
  if (!response.ok) {
    const error = (data && data.error) || {};
    const failure = new ApiError(
      response.status,
      error.code || `HTTP_${response.status}`,
      error.description || response.statusText || `HTTP ${response.status}`,
    );
    if (response.status === 401 && !anonymous && !token) unauthorized(failure);
    throw failure;
  }
  return { status: response.status, data };
}

export const get = async (path, query) => (await call("GET", path, { query })).data;

/** GET /v1/<collection> with the query language: conditions is a list of "field<op>value". */
export async function query(collection, conditions = [], knobs = {}) {
  return get(`/v1/${collection}`, { q: conditions, ...knobs });
}

export async function rows(collection, conditions = [], knobs = {}) {
  return (await query(collection, conditions, knobs)).inventories;
}

export async function getOne(collection, uuid) {
  return (await get(`/v1/${collection}/${uuid}`)).inventories[0];
}

export async function create(collection, params) {
  return (await call("POST", `/v1/${collection}`, { body: { params } })).data;
}

/** PUT <path>/actions {name: params}: the answer ({inventory} or, for a job, {jobUuid}). */
export async function action(path, name, params = {}) {
  return (await call("PUT", `${path}/actions`, { body: { [name]: params } })).data;
}

export async function remove(path, query) {
  return (await call("DELETE", path, { query })).data;
}

/** An API job's state: {done: false, progress} while it runs, {done: true, result} when it
 * succeeded; throws the job's error (its code and description) when it failed. */
export async function jobState(jobUuid) {
  const { status, data } = await call("GET", `/v1/api-jobs/${jobUuid}`);
  if (status === 202) return { done: false, progress: data.progress || 0 };
  return { done: true, result: data.inventory };
}

// -- passwords: what ZStack's clients send is the SHA-512 of the password, in hex ---------------
export async function sha512hex(text) {
  const bytes = new TextEncoder().encode(text);
  if (window.crypto && window.crypto.subtle) {
    const digest = await window.crypto.subtle.digest("SHA-512", bytes);
    return [...new Uint8Array(digest)].map((b) => b.toString(16).padStart(2, "0")).join("");
  }
  return sha512Fallback(bytes); // plain http on another host: no WebCrypto there
}

const M64 = (1n << 64n) - 1n;

function integerRoot(n, k) {
  // the floor of n ** (1 / k), by Newton's method from above
  let x = 1n << BigInt(Math.ceil(n.toString(2).length / Number(k)) + 1);
  for (;;) {
    const y = ((k - 1n) * x + n / x ** (k - 1n)) / k;
    if (y >= x) return x;
    x = y;
  }
}

let constants = null;

function sha512Constants() {
  if (constants) return constants;
  const primes = [];
  for (let n = 2; primes.length < 80; n += 1) if (primes.every((p) => n % p)) primes.push(n);
  constants = {
    // fractional parts of the primes' cube roots and square roots, 64 bits each (FIPS 180-4)
    k: primes.map((p) => integerRoot(BigInt(p) << 192n, 3n) & M64),
    h: primes.slice(0, 8).map((p) => integerRoot(BigInt(p) << 128n, 2n) & M64),
  };
  return constants;
}

export function sha512Fallback(bytes) {
  const { k, h: initial } = sha512Constants();
  const rotr = (x, n) => ((x >> n) | (x << (64n - n))) & M64;
  const length = bytes.length;
  const padded = new Uint8Array(Math.ceil((length + 17) / 128) * 128);
  padded.set(bytes);
  padded[length] = 0x80;
  let bits = BigInt(length) * 8n;
  for (let i = padded.length - 1; bits > 0n; i -= 1, bits >>= 8n) padded[i] = Number(bits & 0xffn);
  const h = [...initial];
  const w = new Array(80);
  for (let block = 0; block < padded.length; block += 128) {
    for (let t = 0; t < 16; t += 1) {
      let word = 0n;
      for (let b = 0; b < 8; b += 1) word = (word << 8n) | BigInt(padded[block + t * 8 + b]);
      w[t] = word;
    }
    for (let t = 16; t < 80; t += 1) {
      const s0 = rotr(w[t - 15], 1n) ^ rotr(w[t - 15], 8n) ^ (w[t - 15] >> 7n);
      const s1 = rotr(w[t - 2], 19n) ^ rotr(w[t - 2], 61n) ^ (w[t - 2] >> 6n);
      w[t] = (w[t - 16] + s0 + w[t - 7] + s1) & M64;
    }
    let [a, b, c, d, e, f, g, hh] = h;
    for (let t = 0; t < 80; t += 1) {
      const s1 = rotr(e, 14n) ^ rotr(e, 18n) ^ rotr(e, 41n);
      const ch = (e & f) ^ (~e & M64 & g);
      const t1 = (hh + s1 + ch + k[t] + w[t]) & M64;
      const s0 = rotr(a, 28n) ^ rotr(a, 34n) ^ rotr(a, 39n);
      const maj = (a & b) ^ (a & c) ^ (b & c);
      const t2 = (s0 + maj) & M64;
      [hh, g, f, e, d, c, b, a] = [g, f, e, (d + t1) & M64, c, b, a, (t1 + t2) & M64];
    }
    [a, b, c, d, e, f, g, hh].forEach((value, i) => {
      h[i] = (h[i] + value) & M64;
    });
  }
  return h.map((x) => x.toString(16).padStart(16, "0")).join("");
}
