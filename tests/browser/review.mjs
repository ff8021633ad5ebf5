// The review page in a real browser (issue 15), on the demo stack the feedback test runs on
// (scripts/lib/80-browser.sh): cast votes through the proxy's own API — thumbs down with
// comments, ratings, a thumbs up — then open /review as the reviewer (the demo's dev user) and
// check that the cards, both charts and the table of negative votes show exactly those votes,
// that the table lists the comments with links to the traces, that the filters work from the
// keyboard, and that the data table behind each chart is there for readers without charts.
// Screenshots go to SCREENSHOT_DIR (docs/images/ holds the committed ones).
//
// Env: CHAT_URL, SCREENSHOT_DIR; CHROMIUM (default /usr/bin/chromium).

import assert from "node:assert/strict";
import { mkdirSync } from "node:fs";
import { launch, required, step } from "./lib.mjs";

const CHAT_URL = required("CHAT_URL").replace(/\/+$/, "");
const SCREENSHOTS = process.env.SCREENSHOT_DIR || "target/browser";
const RUN = Date.now().toString(36);
const COMMENTS = [`wrong year in the table (${RUN})`, `made up a citation (${RUN})`];



/// One answer through the proxy's chat route; resolves with its message id once it ended.
async function chat(chatId, text) {
  const res = await fetch(`${CHAT_URL}/api/chat`, {
    method: "POST",
    headers: { "content-type": "application/json", accept: "text/event-stream", "x-chat-id": chatId },
    body: JSON.stringify({ input: [{ role: "user", content: text }], stream: true, chatId }),
  });
  assert.equal(res.status, 200, `chat answered ${res.status}`);
  const messageId = res.headers.get("x-message-id");
  await res.text();
  return messageId;
}

async function vote(chatId, messageId, body) {
  const res = await fetch(`${CHAT_URL}/api/feedback`, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ chatId, messageId, ...body }),
  });
  const answer = await res.json();
  assert.equal(res.status, 200, JSON.stringify(answer));
}

async function summary() {
  const res = await fetch(`${CHAT_URL}/api/review/summary?bucket=hour&from=${new Date(Date.now() - 24 * 3600e3).toISOString()}`);
  assert.equal(res.status, 200);
  return res.json();
}

mkdirSync(SCREENSHOTS, { recursive: true });
const before = (await summary()).total;
const chatId = `review-${RUN}`;
const cast = [
  { isUpvoted: false, comment: COMMENTS[0] },
  { isUpvoted: false, comment: COMMENTS[1] },
  { isUpvoted: true },
  { name: "rating", value: 2 },
  { name: "rating", value: 5 },
  { name: "rating", value: 4 },
];
for (const [i, body] of cast.entries()) {
  const m = await chat(chatId, `question ${i} for the review page`);
  await vote(chatId, m, body);
}
step(`cast ${cast.length} votes in chat ${chatId}`);
const after = (await summary()).total;
assert.equal(after.votes - before.votes, cast.length, "the summary counts every vote cast");
assert.equal(after.down - before.down, 3, "two thumbs down and a rating of 2 are negative");
assert.equal(after.up - before.up, 3, "a thumbs up and ratings of 4 and 5 are positive");

const browser = await launch();
let page;
try {
  const context = await browser.newContext({ viewport: { width: 1200, height: 900 } });
  page = await context.newPage();
  const errors = [];
  // Console errors, and failed requests by URL (the browser's own favicon probe aside).
  page.on("console", (m) => m.type() === "error" && !m.text().startsWith("Failed to load resource") && errors.push(m.text()));
  page.on("pageerror", (e) => errors.push(String(e)));
  page.on("response", (r) => r.status() >= 400 && !r.url().endsWith("/favicon.ico") && errors.push(`${r.status()} ${r.url()}`));

  step(`opening ${CHAT_URL}/review`);
  await page.goto(`${CHAT_URL}/review`);
  await page.waitForSelector("body[data-loaded]");
  // Last 7 days by default: at least the votes this test cast.
  const votes = Number(await page.locator("#t-votes").textContent());
  assert.ok(votes >= cast.length, `cards show ${votes} votes`);
  const bars = await page.locator("#volume rect").count();
  assert.ok(bars >= 2, `the volume chart draws positive and negative bars (${bars})`);
  assert.ok(await page.locator("#volume polyline").count() === 1, "the negative-rate line is drawn");
  const ratingBars = await page.locator("#dist rect").count();
  assert.ok(ratingBars >= 3, `the rating distribution shows values 2, 4 and 5 (${ratingBars} bars)`);
  const distText = await page.locator("#dist-table").textContent();
  for (const v of ["2", "4", "5"]) assert.ok(distText.includes(v), `rating ${v} in the distribution table`);

  // The table lists the negative votes, newest first, with comments and trace links.
  const rows = page.locator("#votes tbody tr");
  const text = await page.locator("#votes").textContent();
  for (const c of COMMENTS) assert.ok(text.includes(c), `comment "${c}" is in the table`);
  const firstValue = await rows.first().locator("td").nth(3).textContent();
  assert.equal(firstValue, "2", "the newest negative vote (the rating of 2) is listed first");
  const links = await page.locator("#votes tbody a").evaluateAll((as) => as.map((a) => a.href));
  assert.ok(links.length >= 3, `trace links: ${links.length}`);
  for (const l of links) assert.match(l, /#\/experiments\/\d+\/traces\?selectedEvaluationId=tr-[0-9a-f]{32}$/);
  await page.screenshot({ path: `${SCREENSHOTS}/review.png`, fullPage: true });
  step(`screenshot: ${SCREENSHOTS}/review.png`);

  // Filters: only ratings, only votes with a comment (none of the ratings has one); the
  // checkbox and the refresh button are worked from the keyboard.
  const names = await page.locator("#name option").evaluateAll((os) => os.map((o) => o.value));
  assert.deepEqual(names, ["", "rating", "user_feedback"], "the name filter lists the names seen");
  await page.locator("#name").selectOption("rating");
  await page.locator("#has-comment").focus();
  await page.keyboard.press("Space");
  await page.locator("#refresh").focus();
  const loaded = await page.locator("body").getAttribute("data-loaded");
  await page.keyboard.press("Enter");
  await page.waitForFunction((prev) => document.body.dataset.loaded !== prev, loaded);
  assert.equal((await page.locator("#votes").textContent()).includes("No votes match."), true,
    "no rating has a comment");
  await page.locator("#has-comment").uncheck();
  await page.locator("#value").selectOption("all");
  const loaded2 = await page.locator("body").getAttribute("data-loaded");
  await page.locator("#refresh").click();
  await page.waitForFunction((prev) => document.body.dataset.loaded !== prev, loaded2);
  const ratingRows = await rows.count();
  assert.ok(ratingRows >= 3, `all ratings listed (${ratingRows})`);

  // Readers without charts: the data tables open from the keyboard.
  await page.locator("#volume-table").evaluate((t) => t.closest("details").open = true);
  assert.ok(await page.locator("#volume-table tbody tr").count() >= 1);
  await page.screenshot({ path: `${SCREENSHOTS}/review-ratings.png`, fullPage: true });
  assert.deepEqual(errors, [], "no console errors and no failed requests");
  step("review page: cards, charts, table and filters show the votes cast");
} catch (e) {
  if (page) await page.screenshot({ path: `${SCREENSHOTS}/review-failure.png`, fullPage: true }).catch(() => {});
  console.error(e);
  process.exitCode = 1;
} finally {
  await browser.close();
}
