// The web console at `/` with credentials, in headless Chromium (Debian's
// /usr/bin/chromium driven by playwright-core), against gateways run.sh starts:
//   TOKEN_GATEWAY_URL  a gateway with --token $OPERATOR_TOKEN
//   JWT_GATEWAY_URL    a gateway with --token $OPERATOR_TOKEN and --jwt-secret $JWT_SECRET
// The page must load without a credential, ask for a token on the first 401,
// keep it for the tab (sessionStorage) and pass it to EventSource as
// ?access_token=; Send with no session open starts one; replies are Markdown
// whose HTML is escaped, so a reply that carries <script> or an onerror
// handler shows them as text and runs nothing.
// Run with `node --test`. Every wait is bounded (Playwright's timeouts).
import assert from "node:assert/strict";
import crypto from "node:crypto";
import { after, before, test } from "node:test";

import { chromium } from "playwright-core";

const { TOKEN_GATEWAY_URL, JWT_GATEWAY_URL, OPERATOR_TOKEN, JWT_SECRET } = process.env;
assert.ok(TOKEN_GATEWAY_URL && JWT_GATEWAY_URL && OPERATOR_TOKEN && JWT_SECRET,
  "TOKEN_GATEWAY_URL, JWT_GATEWAY_URL, OPERATOR_TOKEN and JWT_SECRET must be set (run.sh sets them)");
const T = 20_000;

/** An HS256 JWT, made the way any front end's library would. */
function mintJwt(claims) {
  const b64 = (v) => Buffer.from(JSON.stringify(v)).toString("base64url");
  const body = `${b64({ alg: "HS256", typ: "JWT" })}.${b64(claims)}`;
  const sig = crypto.createHmac("sha256", JWT_SECRET).update(body).digest("base64url");
  return `${body}.${sig}`;
}

let browser;
before(async () => {
  browser = await chromium.launch({
    executablePath: "/usr/bin/chromium",
    headless: true,
    args: ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
      "--disable-sync", "--no-first-run", "--disable-quic"],
  });
});
after(async () => {
  await browser?.close();
});

/** A page that records script errors; 401s while no token is entered are expected. */
async function openPage(url) {
  const page = await browser.newPage({ viewport: { width: 1200, height: 800 } });
  page.setDefaultTimeout(T);
  const problems = [];
  page.on("pageerror", (e) => problems.push(`page error: ${e.message}`));
  page.on("console", (m) => {
    if (m.type() === "error" && !/401/.test(m.text())) problems.push(`console: ${m.text()}`);
  });
  await page.goto(url);
  return { page, problems };
}

/** Loads the console, which asks for a token; enters `token`. */
async function signIn(url, token) {
  const { page, problems } = await openPage(`${url}/`);
  await page.waitForSelector("#token-form:not([hidden])");
  assert.equal(await page.locator('body[data-ready="true"]').count(), 0, "nothing loaded without a token");
  assert.match(await page.locator("#error").textContent(), /needs a token/);
  await page.fill("#token", token);
  await page.click('#token-form button[type="submit"]');
  await page.waitForSelector('body[data-ready="true"]');
  assert.ok(await page.locator("#token-form").isHidden());
  return { page, problems };
}

/** Types a message with no session open: Send starts one, then sends. */
async function chat(page, text) {
  const streamed = page.waitForRequest((r) => r.url().includes("/events?") && r.url().includes("access_token="));
  await page.fill("#input", text);
  await page.press("#input", "Enter");
  await streamed;
  await page.waitForSelector('.msg[data-status="completed"]');
  return page.locator("#session-id").textContent();
}

test("console with --token: asks for the token, keeps it for the tab, Send starts a session", async () => {
  const { page, problems } = await signIn(TOKEN_GATEWAY_URL, OPERATOR_TOKEN);
  assert.equal(await page.evaluate(() => sessionStorage.getItem("agentgate.token")), OPERATOR_TOKEN);
  assert.equal(await page.evaluate(() => localStorage.length), 0, "nothing is kept beyond the tab");
  await page.selectOption("#agent", "demo");
  const id = await chat(page, "hello, my name is Ada");
  assert.match(id, /^[0-9a-f-]{36}$/);
  assert.match(await page.locator(".msg .reply").first().textContent(), /You said "hello, my name is Ada"/);
  // A reload in the same tab keeps the token: no question this time.
  await page.reload();
  await page.waitForSelector('body[data-ready="true"]');
  assert.ok(await page.locator("#token-form").isHidden());
  assert.equal(await page.locator("#session-id").textContent(), id);
  assert.deepEqual(problems, []);
  await page.close();
});

test("console with a JWT: only the agents of its claim, sessions owned by its sub", async () => {
  const now = Math.floor(Date.now() / 1000);
  const jwt = mintJwt({ sub: "console-user", exp: now + 600, agents: ["demo"] });
  const { page, problems } = await signIn(JWT_GATEWAY_URL, jwt);
  assert.deepEqual(await page.locator("#agent option").allTextContents(), ["demo"]);
  const id = await chat(page, "hi from a JWT");
  const res = await fetch(`${JWT_GATEWAY_URL}/sessions/${id}`, { headers: { Authorization: `Bearer ${OPERATOR_TOKEN}` } });
  assert.equal(res.status, 200);
  assert.equal((await res.json()).owner, "console-user");
  // A refused token (here: expired) asks again.
  const expired = mintJwt({ sub: "console-user", exp: now - 600 });
  await page.evaluate((t) => sessionStorage.setItem("agentgate.token", t), expired);
  await page.click("#refresh");
  await page.waitForSelector("#token-form:not([hidden])");
  assert.match(await page.locator("#error").textContent(), /refused/);
  assert.deepEqual(problems, []);
  await page.close();
});

test("console: a reply with <script> and an onerror handler renders as text and runs nothing", async () => {
  const now = Math.floor(Date.now() / 1000);
  const jwt = mintJwt({ sub: "console-xss", exp: now + 600 });
  const { page, problems } = await signIn(JWT_GATEWAY_URL, jwt);
  await page.selectOption("#agent", "demo");
  const title = await page.title();
  const attack = `<script>window.__pwned = 1; document.title = "pwned"</script> `
    + `<img src=x onerror="window.__pwned = 2; document.title = 'pwned'"> `
    + "[click](javascript:window.__pwned=3) **bold** `code`";
  await chat(page, attack);
  const reply = page.locator(".msg .reply").first();
  const text = await reply.textContent();
  // The demo agent quotes the message: the markup is there, as text.
  assert.ok(text.includes('<script>window.__pwned = 1; document.title = "pwned"</script>'), text);
  assert.ok(text.includes(`<img src=x onerror="window.__pwned = 2; document.title = 'pwned'">`), text);
  assert.equal(await reply.locator("script, img, iframe, [onerror]").count(), 0);
  assert.equal(await reply.locator("a").count(), 0, "a javascript: link is not a link");
  // Markdown still works: **bold** and `code` are formatted.
  assert.equal(await reply.locator("strong").textContent(), "bold");
  assert.equal(await reply.locator("code").textContent(), "code");
  assert.equal(await page.evaluate(() => window.__pwned), undefined);
  assert.equal(await page.title(), title);
  assert.deepEqual(problems, []);
  await page.close();
});
