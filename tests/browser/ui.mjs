// Loads the served page in headless Chromium, picks an example image, generates, and checks
// that progress advanced and the result <video> plays. Usage: node ui.mjs <server-url> [api-key]
// With a key (a server started with --api-key), the page must ask for it exactly once.
import { chromium } from "playwright-core";

const url = process.argv[2];
const key = process.argv[3];
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--no-sandbox", "--autoplay-policy=no-user-gesture-required"],
});
const fail = async (msg) => {
  console.error("browser test failed: " + msg);
  await browser.close();
  process.exit(1);
};
try {
  const page = await browser.newPage();
  page.on("console", (m) => console.log("page console:", m.text()));
  page.on("pageerror", (e) => console.log("page error:", e.message));
  let asked = 0;
  page.on("dialog", async (d) => {
    asked += 1;
    if (key && d.type() === "prompt") await d.accept(key);
    else await d.dismiss();
  });
  await page.goto(url);
  await page.waitForFunction(() => document.getElementById("model-line").textContent.startsWith("model "));

  // An example from the gallery fills the image input and the prompt.
  await page.click("#gallery figure");
  await page.waitForFunction(() => document.getElementById("image").files.length === 1);
  const prompt = await page.inputValue("#prompt");
  if (!prompt) await fail("the example did not fill the prompt");
  await page.$eval("#steps", (el) => { el.value = 4; el.dispatchEvent(new Event("input")); });
  // The sampler select lists the API's samplers; Karras levels only where they apply.
  const samplers = await page.$$eval("#sampler option", (os) => os.map((o) => o.value));
  if (!samplers.includes("ddim") || !samplers.includes("unipc")) await fail("sampler choices: " + samplers);
  if (!(await page.isDisabled("#karras"))) await fail("karras is offered with ddim");
  await page.selectOption("#sampler", "dpmpp-2m");
  if (await page.isDisabled("#karras")) await fail("karras is not offered with dpmpp-2m");
  await page.check("#karras");

  // Record every status line and progress value the page shows.
  await page.evaluate(() => {
    window.seen = [];
    const status = document.getElementById("status");
    const progress = document.getElementById("progress");
    new MutationObserver(() => window.seen.push([status.textContent, progress.value]))
      .observe(status, { childList: true, characterData: true, subtree: true });
  });
  await page.click("#generate");
  await page.waitForFunction(() => /^(Done|Failed|Cancelled)/.test(document.getElementById("status").textContent),
    null, { timeout: 180000 });
  const seen = await page.evaluate(() => window.seen);
  console.log("status lines:", JSON.stringify(seen.map(([s]) => s)));
  const final = seen[seen.length - 1][0];
  if (!final.startsWith("Done")) await fail("the job ended with: " + final + " / " + await page.textContent("#error"));
  if (!seen.some(([s]) => s.startsWith("Queued"))) await fail("no queue position was shown");
  const steps = seen.filter(([s]) => /^Step \d+\/4/.test(s));
  if (steps.length === 0) await fail("no step progress was shown");
  const values = steps.map(([, v]) => v);
  if (!values.every((v, i) => v > 0 && (i === 0 || v >= values[i - 1]))) await fail("progress did not advance: " + values);

  const timings = await page.$$eval("#timings tr", (rows) => rows.map((r) => r.textContent));
  if (!timings.some((t) => t.includes("denoise"))) await fail("no stage timings shown: " + timings);
  if (!timings.some((t) => t.includes("dpmpp-2m karras, 4 steps"))) await fail("the run did not use the chosen sampler: " + timings);
  if (asked !== (key ? 1 : 0)) await fail(`the page asked for the API key ${asked} times`);
  const href = await page.getAttribute("#download", "href");
  if (!href || !href.endsWith("/video")) await fail("no download link");

  // The video loads, has frames and plays.
  await page.waitForFunction(() => {
    const v = document.getElementById("result");
    return v.readyState >= 2 && v.videoWidth > 0;
  }, null, { timeout: 30000 }).catch(async () => {
    const err = await page.evaluate(() => { const v = document.getElementById("result"); return [v.error && v.error.code, v.currentSrc, v.readyState]; });
    await fail("the video did not load: " + JSON.stringify(err));
  });
  const play = await page.evaluate(async () => {
    const v = document.getElementById("result");
    await v.play();
    const t0 = v.currentTime;
    await new Promise((r) => setTimeout(r, 700));
    return { t0, t1: v.currentTime, width: v.videoWidth, height: v.videoHeight, duration: v.duration, paused: v.paused };
  });
  console.log("video:", JSON.stringify(play));
  if (play.paused || !(play.t1 > play.t0 || play.t1 > 0)) await fail("the video does not play: " + JSON.stringify(play));

  // A long job is cancelled from the page; a cleared input (the seed) is left out, not sent empty.
  await page.$eval("#steps", (el) => { el.value = 60; el.dispatchEvent(new Event("input")); });
  await page.fill("#seed", "");
  await page.click("#generate");
  await page.waitForFunction(() => /^Step \d+\/60/.test(document.getElementById("status").textContent), null, { timeout: 120000 })
    .catch(async () => fail("the long job did not start: " + await page.textContent("#status") + " / " + await page.textContent("#error")));
  await page.click("#cancel");
  await page.waitForFunction(() => /^(Done|Failed|Cancelled)/.test(document.getElementById("status").textContent), null, { timeout: 120000 });
  const cancelled = await page.textContent("#status");
  if (!cancelled.startsWith("Cancelled")) await fail("cancel ended the job with: " + cancelled);
  console.log("browser test passed");
} catch (e) {
  await fail(e.stack || String(e));
}
await browser.close();
