import java.util.Arrays;
import org.apache.beam.sdk.expansion.service.ExpansionServer;
import org.apache.beam.sdk.expansion.service.ExpansionService;
import org.apache.beam.sdk.expansion.service.ExpansionServiceOptions;
import org.apache.beam.sdk.options.PipelineOptions;
import org.apache.beam.sdk.options.PipelineOptionsFactory;

/**
 * Beam's Java expansion service bound to one address (Beam's own main listens on every
 * interface). Usage: HOST PORT [--defaultEnvironmentType=EMBEDDED ...expansion options].
 */
public final class LoopbackExpansionService {
  private LoopbackExpansionService() {}

  public static void main(String[] args) throws Exception {
    String host = args[0];
    int port = Integer.parseInt(args[1]);
    PipelineOptionsFactory.register(ExpansionServiceOptions.class);
    PipelineOptions options =
        PipelineOptionsFactory.fromArgs(Arrays.copyOfRange(args, 2, args.length)).create();
    ExpansionService service = new ExpansionService(options, host + ":" + port);
    try (ExpansionServer server = ExpansionServer.create(service, host, port)) {
      System.out.println("Expansion service listening on " + host + ":" + server.getPort());
      System.out.flush();
      Thread.currentThread().join();
    }
  }
}
