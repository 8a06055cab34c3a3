// `review`: the local page to judge a run's dev responses blind and choose its checkpoint.
// It runs until Ctrl-C (exit 130), after every judgment received is on disk.
import { Command, Option } from 'commander';
import { startReview } from '../../review/server.js';
import { int, InterruptedError } from '../options.js';

/** The `review` command. */
export function reviewCommand(): Command {
  return new Command('review')
    .description(
      "a local page (127.0.0.1 only, a token in its URL) to compare a run's dev responses blind, epoch against epoch, " +
        'see wins, ties and losses per epoch beside EOT share, length, repetition and dev loss, and choose the checkpoint ' +
        '(judgments go to <run>/review.jsonl, the choice to <run>/chosen.json)',
    )
    .argument('<run>', "a fine-tuning run folder (finetune's --out)")
    .addOption(new Option('--port <n>', 'port on 127.0.0.1 (0: any free port)').argParser(int({ min: 0, max: 65535 })).default(0))
    .option('--against <run>', "another run folder: its epochs are compared with this run's")
    .action(async (run: string, v: { port: number; against?: string }) => {
      const server = await startReview({ run, against: v.against, port: v.port });
      const stopped = new Promise<void>((ok) => {
        process.once('SIGINT', () => ok());
      });
      console.log(`review page: ${server.url}`);
      console.error('open it in a browser on this machine; Ctrl-C stops the server');
      await stopped;
      await server.close();
      throw new InterruptedError();
    });
}
