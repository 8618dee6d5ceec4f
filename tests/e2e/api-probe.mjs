// The API server's own capacity, for comparison with the end-to-end figure: 50 senders post
// pushes of one `item.create` mutation each straight to the API server (no zero-cache, no Zero
// client), each sender in mutation-id order.
//   node api-probe.mjs <mutate URL> <senders> <pushes per sender>
// Prints {"n", "ms", "rate"}.
const [url, sendersText, perText] = process.argv.slice(2);
const senders = Number(sendersText);
const per = Number(perText);
const full = `${url}?schema=zero_0&appID=zero`;
const t0 = performance.now();
await Promise.all(
  Array.from({length: senders}, async (_, c) => {
    const cid = `probe-${c}-${Date.now()}`;
    for (let i = 1; i <= per; i++) {
      const body = {
        clientGroupID: `g-${cid}`,
        mutations: [
          {type: 'custom', id: i, clientID: cid, name: 'item.create',
           args: [{id: `${cid}-${i}`, title: 'probe', n: i}], timestamp: Date.now()},
        ],
        pushVersion: 1,
        timestamp: Date.now(),
        requestID: `r${i}`,
      };
      const r = await fetch(full, {method: 'POST', headers: {'content-type': 'application/json'}, body: JSON.stringify(body)});
      const j = await r.json();
      if (j.mutations?.[0]?.result?.error) {
        process.stdout.write(JSON.stringify({error: j}) + '\n');
        process.exit(1);
      }
    }
  }),
);
const ms = performance.now() - t0;
process.stdout.write(JSON.stringify({n: senders * per, ms, rate: (senders * per) / (ms / 1000)}) + '\n');
