// The web console at `/` and examples/stream.html in headless Chromium
// (Debian's /usr/bin/chromium driven by playwright-core), against a real
// gateway that run.sh starts:
//   GATEWAY_URL     the gateway (profiles: demo, endless, asker; it allows
//                   EXAMPLES_URL's origin by CORS). asker is the real Claude
//                   Code CLI against the mock Anthropic API
//                   (examples/mock_anthropic.rs --bash-on-touch): a message
//                   `touch FILE` makes the model ask for that Bash command.
//   EXAMPLES_URL    a static server of examples/
//   SCREENSHOTS     where the screenshots go (target/contract)
//   CLAUDE_WORKDIR  asker's working directory (and HOME): the files it touches
// Run with `node --test`. Every wait is bounded (Playwright's timeouts).
import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import fs from "node:fs";
import path from "node:path";

import { chromium } from "playwright-core";

const { GATEWAY_URL, EXAMPLES_URL, SCREENSHOTS, CLAUDE_WORKDIR } = process.env;
assert.ok(GATEWAY_URL && EXAMPLES_URL && SCREENSHOTS && CLAUDE_WORKDIR,
  "GATEWAY_URL, EXAMPLES_URL, SCREENSHOTS and CLAUDE_WORKDIR must be set (run.sh sets them)");
const T = 20_000;

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

/** A page that fails the test on any script error or console error. */
async function openPage(url) {
  const page = await browser.newPage({ viewport: { width: 1200, height: 800 } });
  page.setDefaultTimeout(T);
  const problems = [];
  page.on("pageerror", (e) => problems.push(`page error: ${e.message}`));
  page.on("console", (m) => { if (m.type() === "error") problems.push(`console: ${m.text()}`); });
  await page.goto(url);
  return { page, problems };
}

/** Records every distinct length the text of `selector`'s elements goes through. */
async function watchText(page, selector) {
  await page.evaluate((sel) => {
    window.__lengths = new Map();
    const record = () => {
      document.querySelectorAll(sel).forEach((el, i) => {
        const key = el.closest("[data-message-id]")?.dataset.messageId ?? String(i);
        const seen = window.__lengths.get(key) ?? new Set();
        seen.add(el.textContent.length);
        window.__lengths.set(key, seen);
      });
    };
    new MutationObserver(record).observe(document.body, { subtree: true, childList: true, characterData: true });
  }, selector);
}

/** How many different non-empty lengths the text had, per key. */
async function lengthsSeen(page) {
  return page.evaluate(() => Object.fromEntries([...window.__lengths].map(([k, v]) => [k, [...v].filter((n) => n > 0).length])));
}

async function send(page, text) {
  await page.fill("#input", text);
  await page.press("#input", "Enter");
}

async function newSession(page, agent) {
  const before = await page.locator("#session-id").textContent();
  await page.selectOption("#agent", agent);
  await page.click("#new-session");
  await page.waitForFunction((old) => {
    const id = document.getElementById("session-id").textContent;
    return id && id !== old && location.hash === "#" + id;
  }, before);
  return page.locator("#session-id").textContent();
}

const replies = (page) => page.locator(".msg .reply").allTextContents();
const inputs = (page) => page.locator(".msg .input").allTextContents();

test("console: chat with the demo agent, streamed; reload shows the history; reconnect resumes", async () => {
  const { page, problems } = await openPage(`${GATEWAY_URL}/`);
  await page.waitForSelector('body[data-ready="true"]');
  const agents = await page.locator("#agent option").allTextContents();
  assert.deepEqual([...agents].sort(), ["asker", "demo", "endless"]);

  const id = await newSession(page, "demo");
  await page.waitForSelector('#session-state[data-state="idle"]');
  await watchText(page, ".msg .reply");
  await send(page, "hello, my name is Ada");
  await page.waitForSelector('.msg[data-status="completed"]');
  const [first] = await replies(page);
  assert.match(first, /You said "hello, my name is Ada"/);
  const seen = Object.values(await lengthsSeen(page));
  // The demo agent streams word by word: the page showed the reply growing.
  assert.ok(seen[0] >= 3, `the reply grew in steps, not at once: ${JSON.stringify(seen)}`);

  await send(page, "what did I say first?");
  await page.waitForFunction(() => document.querySelectorAll('.msg[data-status="completed"]').length === 2);
  assert.equal((await replies(page))[1], 'First you said: "hello, my name is Ada"');
  await page.screenshot({ path: path.join(SCREENSHOTS, "console.png") });

  // Reload: the session comes back from the URL, its history from the API.
  await page.reload();
  await page.waitForSelector('body[data-ready="true"]');
  assert.equal(await page.locator("#session-id").textContent(), id);
  await page.waitForFunction(() => document.querySelectorAll('.msg[data-status="completed"]').length === 2);
  assert.deepEqual(await inputs(page), ["hello, my name is Ada", "what did I say first?"]);
  assert.deepEqual(await replies(page), [first, 'First you said: "hello, my name is Ada"']);
  await page.waitForFunction(() => Number(document.getElementById("stream-status").dataset.lastEventId) > 0);

  // Reconnect resumes after the last event seen: nothing is shown twice.
  const lastId = Number(await page.locator("#stream-status").getAttribute("data-last-event-id"));
  const resumed = page.waitForRequest((r) => r.url().includes(`/sessions/${id}/events?after=${lastId}`));
  await page.click("#reconnect");
  await resumed;
  await page.waitForSelector("#stream-status:has-text('live (resumed after event')");
  await send(page, "count");
  await page.waitForFunction(() => document.querySelectorAll('.msg[data-status="completed"]').length === 3);
  assert.equal(await page.locator(".msg").count(), 3);
  assert.deepEqual((await replies(page)).slice(0, 2), [first, 'First you said: "hello, my name is Ada"']);
  assert.equal((await replies(page))[2], "You have sent 2 messages before this one.");
  assert.ok(Number(await page.locator("#stream-status").getAttribute("data-last-event-id")) > lastId);

  // The session list shows it; closing it ends the stream with session.closed.
  await page.click("#refresh");
  await page.waitForSelector(`#sessions li.current[data-session-id="${id}"]`);
  await page.click("#close-session");
  await page.waitForSelector('#session-state[data-state="closed"]');
  await page.waitForSelector(".notice:has-text('Session closed: deleted')");
  assert.deepEqual(problems, []);
  await page.close();
});

test("console: the Interrupt button stops a reply that would never end", async () => {
  const { page, problems } = await openPage(`${GATEWAY_URL}/`);
  await page.waitForSelector('body[data-ready="true"]');
  await newSession(page, "endless");
  await page.waitForSelector('#session-state[data-state="idle"]');
  await send(page, "still going");
  await page.waitForSelector('.msg[data-status="running"] .reply:has-text("still going")');
  await page.waitForSelector('#session-state[data-state="busy"]');
  await page.click("#interrupt");
  await page.waitForSelector('.msg[data-status="interrupted"]');
  assert.match(await page.locator(".msg .status").textContent(), /interrupted/);
  await page.click("#close-session");
  await page.waitForSelector('#session-state[data-state="closed"]');
  assert.deepEqual(problems, []);
  await page.close();
});

test("console: permission prompts of the real claude CLI get Allow and Deny buttons that answer it", async () => {
  const allowed = path.join(CLAUDE_WORKDIR, "allowed");
  const denied = path.join(CLAUDE_WORKDIR, "denied");
  const { page, problems } = await openPage(`${GATEWAY_URL}/`);
  await page.waitForSelector('body[data-ready="true"]');
  await newSession(page, "asker");
  await send(page, `touch ${allowed}`);
  const card = page.locator(".permission").first();
  await card.waitFor();
  assert.match(await card.textContent(), /Bash/);
  assert.match(await card.locator("pre").textContent(), new RegExp(`"command": "touch ${allowed}"`));
  assert.ok(!fs.existsSync(allowed), "nothing ran before the answer");
  await card.locator('button[data-behavior="allow"]').click();
  await page.waitForSelector('.msg[data-status="completed"]');
  // The mock model answers the tool result with its default text.
  assert.match((await replies(page))[0], /^mock reply #\d+: .*last=tool_result:/);
  assert.match(await card.textContent(), /allowed/);
  assert.ok(fs.existsSync(allowed), `Allow ran the command: ${allowed} exists`);
  // Every stream-json line of the agent is shown under its message.
  assert.match(await page.locator(".msg details summary").first().textContent(), /agent events \(\d+\)/);

  await send(page, `touch ${denied}`);
  const second = page.locator(".permission").nth(1);
  await second.waitFor();
  assert.match(await second.locator("pre").textContent(), new RegExp(`"command": "touch ${denied}"`));
  await second.locator('button[data-behavior="deny"]').click();
  await page.waitForFunction(() => document.querySelectorAll('.msg[data-status="completed"]').length === 2);
  // The model got the console's reason as the tool result.
  assert.match((await replies(page))[1], /^mock reply #\d+: .*last=tool_result:denied in the agentgate console/);
  assert.match(await second.textContent(), /denied/);
  assert.ok(!fs.existsSync(denied), `Deny did not run the command: ${denied} does not exist`);
  await page.screenshot({ path: path.join(SCREENSHOTS, "console-permissions.png") });
  await page.click("#close-session");
  await page.waitForSelector('#session-state[data-state="closed"]');
  assert.deepEqual(problems, []);
  await page.close();
});

test("console: an attached image goes as an image block, shows with its message and reaches the real claude CLI", async () => {
  // A 1×1 PNG.
  const png = Buffer.from("89504e470d0a1a0a0000000d49484452000000010000000108060000001f15c4890000000d49444154789c6360000002000001e221bc330000000049454e44ae426082", "hex");
  const src = `data:image/png;base64,${png.toString("base64")}`;
  const { page, problems } = await openPage(`${GATEWAY_URL}/`);
  await page.waitForSelector('body[data-ready="true"]');
  const id = await newSession(page, "asker");
  await page.setInputFiles("#attach", { name: "dot.png", mimeType: "image/png", buffer: png });
  await page.waitForSelector('#attachments figure[data-media-type="image/png"] img');
  await send(page, "what is this");
  await page.waitForSelector('.msg[data-status="completed"]');
  assert.equal(await page.locator("#attachments figure").count(), 0, "sending clears the attachments");
  // The gateway got text and image blocks; the model got the image (the CLI
  // follows it with an `[Image: source: …]` text block, which the mock echoes).
  const { messages } = await (await fetch(`${GATEWAY_URL}/sessions/${id}/messages`)).json();
  assert.deepEqual(messages[0].input, [
    { type: "text", text: "what is this" },
    { type: "image", source: { type: "base64", media_type: "image/png", data: png.toString("base64") } },
  ]);
  assert.match((await replies(page))[0], /last=\[Image/);
  // The message shows its text and its image, decoded by the browser.
  const shown = async () => {
    await page.waitForFunction(() => {
      const img = document.querySelector(".msg .input img");
      return img && img.complete && img.naturalWidth === 1;
    });
    assert.equal(await page.locator(".msg .input img").getAttribute("src"), src);
    assert.match((await inputs(page))[0], /^what is this/);
  };
  await shown();
  // After a reload the history shows it the same way.
  await page.reload();
  await page.waitForSelector('body[data-ready="true"]');
  await page.waitForSelector('.msg[data-status="completed"]');
  await shown();
  // Only images can be attached.
  await page.setInputFiles("#attach", { name: "notes.txt", mimeType: "text/plain", buffer: Buffer.from("hi") });
  await page.waitForSelector("#error:has-text('only png, jpeg, gif and webp')");
  assert.equal(await page.locator("#attachments figure").count(), 0);
  await page.click("#close-session");
  await page.waitForSelector('#session-state[data-state="closed"]');
  assert.deepEqual(problems, []);
  await page.close();
});

test("examples/stream.html streams a POST with fetch + ReadableStream from another origin", async () => {
  const { page, problems } = await openPage(`${EXAMPLES_URL}/stream.html?gateway=${encodeURIComponent(GATEWAY_URL)}`);
  await watchText(page, "#output");
  await page.click("#send");
  await page.waitForSelector("#status:has-text('completed in')");
  assert.match(await page.locator("#output").textContent(), /You said "hello, my name is Ada"/);
  const seen = Object.values(await lengthsSeen(page));
  assert.ok(seen[0] >= 3, `the reply grew in steps: ${JSON.stringify(seen)}`);
  // Same session the second time: the demo agent remembers the first message.
  await page.fill("#content", "what did I say first?");
  await page.click("#send");
  await page.waitForSelector("#status:has-text('completed in')");
  assert.equal(await page.locator("#output").textContent(), 'First you said: "hello, my name is Ada"\n');
  await page.screenshot({ path: path.join(SCREENSHOTS, "stream-example.png") });
  assert.deepEqual(problems, []);
  await page.close();
});
