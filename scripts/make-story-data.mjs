// Writes data/stories-sft/{train,dev}.jsonl: the demo's LIMA-style set for the bundled
// stories260K base model, written for this project. Requests name a character and an object;
// the answers are short TinyStories-style stories (the base model's own register) that use both.
// Dev requests use names and objects that never occur anywhere in the training rows, so the
// demo's "uses the requested name and object" share measures following the request, not recall.
//
//   node scripts/make-story-data.mjs            (deterministic; rewrites both files)
import { mkdirSync, writeFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const out = join(dirname(fileURLToPath(import.meta.url)), '..', 'data', 'stories-sft');

// name, pronoun (she/he). Many names, each in a few rows only, so the model has to take the
// requested name from the request instead of learning a handful of favourites.
const trainNames = [
  ['Sara', 'she'], ['Joe', 'he'], ['Emma', 'she'], ['Dan', 'he'], ['Rose', 'she'], ['Finn', 'he'], ['Kim', 'she'],
  ['Bob', 'he'], ['Pip', 'he'], ['Dot', 'she'], ['Kai', 'he'], ['Bea', 'she'], ['Wes', 'he'],
  ['Tess', 'she'], ['Jed', 'he'], ['Fay', 'she'], ['Ned', 'he'], ['Meg', 'she'], ['Lou', 'he'], ['Jill', 'she'],
  ['Ted', 'he'], ['Ann', 'she'], ['Roy', 'he'], ['Eve', 'she'], ['Al', 'he'], ['Liz', 'she'], ['Ken', 'he'],
  ['Pam', 'she'], ['Bill', 'he'], ['Jen', 'she'], ['Walt', 'he'], ['Kate', 'she'], ['Mark', 'he'], ['Beth', 'she'],
  ['Carl', 'he'], ['Jane', 'she'], ['Paul', 'he'], ['Molly', 'she'], ['Will', 'he'], ['Polly', 'she'], ['Fred', 'he'],
  ['Daisy', 'she'], ['Zoe', 'she'], ['Leo', 'he'], ['Ivy', 'she'], ['Rex', 'he'], ['Nora', 'she'], ['Hugo', 'he'],
  ['Ruby', 'she'], ['Gus', 'he'], ['Nina', 'she'], ['Ray', 'he'], ['Ella', 'she'],
];
// object, colour or size word
const trainObjects = [
  ['boat', 'yellow'], ['kite', 'blue'], ['hat', 'green'], ['cup', 'pink'], ['box', 'big'], ['bell', 'shiny'],
  ['book', 'old'], ['drum', 'loud'], ['shoe', 'white'], ['bike', 'fast'], ['cake', 'sweet'], ['bag', 'brown'],
  ['rock', 'smooth'], ['key', 'gold'], ['flower', 'purple'], ['sock', 'warm'], ['frog', 'green'], ['star', 'bright'],
  ['bowl', 'blue'], ['pen', 'red'], ['fish', 'orange'], ['leaf', 'yellow'], ['ring', 'shiny'], ['cap', 'black'],
  ['map', 'old'], ['pot', 'big'], ['bus', 'red'], ['egg', 'white'], ['hen', 'brown'], ['duck', 'yellow'],
  ['fan', 'blue'], ['mug', 'green'], ['chair', 'tall'], ['coat', 'warm'], ['horn', 'loud'], ['wagon', 'red'],
  ['sled', 'fast'], ['pie', 'warm'], ['ship', 'big'], ['truck', 'blue'], ['lamp', 'bright'], ['spoon', 'silver'],
  ['shell', 'pretty'], ['clock', 'funny'], ['tent', 'orange'], ['jar', 'heavy'], ['whistle', 'small'], ['apple', 'ripe'],
];
// Dev: names and objects that TinyStories is full of, so the base model knows them well, and
// that never occur in the fine-tuning data — LIMA's point is that the knowledge comes from
// pretraining and the few examples only teach the format.
const devNames = [
  ['Lily', 'she'], ['Tim', 'he'], ['Sue', 'she'], ['Ben', 'he'], ['Mia', 'she'], ['Tom', 'he'], ['Lucy', 'she'],
  ['Max', 'he'], ['Anna', 'she'], ['Sam', 'he'], ['Amy', 'she'], ['Jack', 'he'],
];
const devObjects = [
  ['ball', 'red'], ['toy', 'new'], ['car', 'little'], ['doll', 'soft'], ['bear', 'fluffy'], ['dog', 'big'],
  ['cat', 'little'], ['bird', 'little'], ['puppy', 'happy'], ['tree', 'tall'], ['balloon', 'round'], ['kitten', 'tiny'],
];

const cap = (s) => s[0].toUpperCase() + s.slice(1);
const an = (w) => (/^[aeiou]/.test(w) ? `an ${w}` : `a ${w}`);
const his = (p) => (p === 'she' ? 'her' : 'his');
const him = (p) => (p === 'she' ? 'her' : 'him');

const requests = [
  (n, o, c) => `Write a short story about ${n} and ${an(c)} ${o}.`,
  (n, o, c) => `Tell me a story about ${n} who finds ${an(c)} ${o}.`,
  (n, o) => `Can you write a story for kids about ${n} and a ${o}?`,
  (n, o, c) => `Please tell a bedtime story about ${n} and ${an(c)} ${o}.`,
  (n, o) => `I want a little story. It should be about ${n} and a ${o}.`,
  (n, o, c) => `Write a happy story where ${n} plays with ${an(c)} ${o}.`,
];

// Story bodies in the base model's register: short sentences, simple words, a small turn, an end.
const stories = [
  (n, p, o, c) =>
    `Once upon a time, there was a little ${p === 'she' ? 'girl' : 'boy'} named ${n}. ${cap(p)} had ${an(c)} ${o}. ${n} loved the ${o} very much. One day, the ${o} was gone! ${n} looked under the bed and in the garden. At last ${p} found the ${o} next to the door. ${n} was so happy. ${cap(p)} hugged the ${c} ${o} and smiled.`,
  (n, p, o, c) =>
    `One sunny day, ${n} went to the park. There ${p} saw ${an(c)} ${o} on the grass. "Whose ${o} is this?" ${p} asked. A kind man said, "It is for you." ${n} said, "Thank you!" ${cap(p)} played with the ${o} all day. When the sun went down, ${n} took the ${o} home.`,
  (n, p, o, c) =>
    `${n} had a friend named Spot. One day ${n} and Spot found ${an(c)} ${o} by the river. Spot wanted the ${o} too. ${n} said, "Let's share it." They took turns with the ${o}. They laughed and had fun. ${n} learned that sharing makes friends happy.`,
  (n, p, o, c) =>
    `There was once a ${c} ${o} in a little shop. Every day ${n} looked at it. ${cap(p)} wanted it so much. ${n} helped ${his(p)} mom and saved ${his(p)} coins. After many days, ${p} had enough. ${n} bought the ${c} ${o}. It was the best day ever.`,
  (n, p, o, c) =>
    `${n} was sad because it was raining. ${cap(p)} could not go outside. Then ${his(p)} dad gave ${him(p)} ${an(c)} ${o}. ${n} played with the ${o} in the house. ${cap(p)} forgot about the rain. When the rain stopped, ${n} ran outside with the ${o} and played in the sun.`,
  (n, p, o, c) =>
    `Once there was a ${p === 'she' ? 'girl' : 'boy'} called ${n}. ${cap(p)} lived near the sea. One morning ${p} found ${an(c)} ${o} in the sand. ${n} wanted to keep it, but ${p} thought, "Maybe someone lost it." ${cap(p)} asked a little girl on the beach. "That is my ${o}!" she said. ${n} gave it back, and the girl gave ${n} a big hug.`,
  (n, p, o, c) =>
    `${n} and ${his(p)} mom went for a walk in the woods. They saw the sun shine. Then ${n} saw something ${c} under a leaf. It was ${an(c)} ${o}! "Can I take it home?" ${n} asked. "Yes," said Mom. ${n} put the ${o} on ${his(p)} shelf. Every night ${p} looked at it and smiled.`,
];

const followUps = [
  ['Make it shorter, please.', (n, p, o, c) => `${n} had ${an(c)} ${o}. One day ${p} lost it. ${cap(p)} looked and looked. At last ${p} found it and was very happy.`],
  ['What happened next?', (n, p, o) => `The next day, ${n} showed the ${o} to ${his(p)} friends. They all wanted to play. ${n} let them play with the ${o} too. They had a fun day together.`],
  ['Can you give it a funny ending?', (n, p, o) => `Then the ${o} started to talk! "Hello, ${n}," it said. ${n} was so surprised that ${p} fell on the grass. Then ${p} laughed and laughed.`],
];

/** One request + story conversation; every fourth one continues with a follow-up turn. */
function rows(names, objects, count, seed, withFollowUps) {
  const out = [];
  for (let i = 0; i < count; i++) {
    const [n, p] = names[(i * 7 + seed) % names.length];
    const [o, c] = objects[(i * 5 + seed * 3 + Math.floor(i / objects.length)) % objects.length];
    const req = requests[(i + seed) % requests.length](n, o, c);
    const story = stories[(i * 5 + seed) % stories.length](n, p, o, c);
    const conv = [req, story];
    if (withFollowUps && i % 4 === 3) {
      const [ask, answer] = followUps[(i >> 2) % followUps.length];
      conv.push(ask, answer(n, p, o, c));
    }
    out.push({ conversations: conv, request: { name: n, object: o } });
  }
  return out;
}

const train = rows(trainNames, trainObjects, 120, 0, true);
const dev = rows(devNames, devObjects, 24, 3, false);

// The promise the demo's metric rests on: no dev name or object anywhere in the training text.
const trainText = train.map((r) => r.conversations.join('\n')).join('\n').toLowerCase();
for (const { request } of dev)
  for (const w of [request.name, request.object])
    if (new RegExp(`\\b${w.toLowerCase()}(s|es|'s)?\\b`).test(trainText)) throw new Error(`dev word "${w}" occurs in the training data`);

mkdirSync(out, { recursive: true });
const jsonl = (rs) => rs.map((r) => JSON.stringify(r)).join('\n') + '\n';
writeFileSync(join(out, 'train.jsonl'), jsonl(train));
writeFileSync(join(out, 'dev.jsonl'), jsonl(dev));
console.log(`wrote ${out}: ${train.length} training conversations (${train.filter((r) => r.conversations.length > 2).length} multi-turn), ${dev.length} dev requests`);
